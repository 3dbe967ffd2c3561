"""Local stand-ins of the cluster, for tests, benchmarks and `make demo`.

Each launcher starts a real server on loopback as a child process, waits until it answers, and
stops it (process group and all) when its context exits. Not part of any distribution.
"""
