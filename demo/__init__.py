"""`make demo` (``python -m demo``): the whole product on one machine, with real servers.

Not part of any distribution: it drives the testbed's local stand-ins of the cluster (a Spark
Connect server, the dev Auth2, kbproxy, S3 behind a Delta Lake Proxy emulator) and the real
kbdaemon and kbclient, in a HOME of its own, and cleans up whatever it started.
"""
