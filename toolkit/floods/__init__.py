"""Hostile and overloading callers, and the monitors that watch a server meanwhile.

Each flood is a coroutine taking the server's address, so that `make floods`
(bench/floods) runs it at full size in a process of its own and
tests/test_overload.py at a small scale; both watch the server with the
same monitors (`observing.observe`) and read the same figures (`Report`).
"""
