"""Stand-alone scripts run by a peer's own Python (its virtual environment), never imported here.

Each script reads a case file written by :func:`tomodose.benchmarking.static_peers.export_case`
(NumPy ``.npz``: CT numbers, grid, target and body masks, beam geometry) and prints one JSON
object on its last stdout line: timings (import, setup, compute), peak memory, problem sizes.
They import nothing from tomodose, so the peer's pinned dependencies cannot clash with ours.
"""
