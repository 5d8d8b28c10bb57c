"""An export on disk: deterministic content.

Two exports of one block give byte-identical files, so that a checksum of an export
means something: every node of an exported graph has a fixed name, and the version
counters NNVM keeps on graph edges (they count how often a variable was used in the
process, and differ between two traces of one network) are written as 0; MXNet reads
them back and runs the graph the same.
"""
import json

import mxnet as mx


def canonical_graph(symbol: mx.sym.Symbol) -> dict:
    """``symbol`` as a JSON object, with every edge's version counter set to 0."""
    graph = json.loads(symbol.tojson())
    _zero_versions(graph)
    return graph


def canonical_json(symbol: mx.sym.Symbol) -> str:
    """The text of :func:`canonical_graph`, in MXNet's own JSON layout."""
    return mx.sym.load_json(json.dumps(canonical_graph(symbol))).tojson()


def _zero_versions(graph: dict) -> None:
    for node in graph['nodes']:
        for entry in node['inputs']:
            entry[2] = 0
        for sub in node.get('subgraphs', []):
            _zero_versions(sub)
    for entry in graph['heads']:
        entry[2] = 0
