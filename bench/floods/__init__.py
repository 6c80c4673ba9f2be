"""`python -m bench.floods`: hostile and overloading callers against a real server.

Each flood runs against a fresh `python -m service` process (this checkout's,
or another one's with --server-root, e.g. a git worktree of an older commit)
on a throw-away embedded PostgreSQL (or BENCH_DATABASE_URL), while monitors
watch it from outside the way operators and load balancers do:

- the server's RSS (with its workers'), every 0.25 s;
- Health.Watch on "" (how often SERVING flipped to NOT_SERVING, and for how long),
  and whether the log says "pool renewed" (the watcher took load for an outage);
- a well-behaved caller on its own connection: GetUser every 100 ms, 5 s
  deadline, retrying OVERLOADED refusals with backoff as a gRPC retry policy would.

The floods (toolkit/floods: each a coroutine taking an address, which
tests/test_overload.py runs at a small scale):

- bad-masks:  callers sending UpdateUser with a huge invalid update_mask, repeatedly;
- list-flood: connections x streams of ListUsers(page_size 1000) with a deadline;
- never-read: raw HTTP/2 clients that open ListUsers streams and never read the socket;
- idle-conns: plain TCP connections that never send a byte, while a new
  client connects every second.

The driver runs each flood in a process of its own, so that its thousands of
calls in flight do not lag the monitors' event loop.

    python -m bench.floods                           # every flood, full size, 30 s each
    python -m bench.floods list-flood --seconds 10 --connections 20
    python -m bench.floods --server-root /tmp/before --json before.json
    python -m bench.floods --env MAX_CONCURRENT_RPCS=40   # a server setting

Figures are printed, and written as JSON with --json. On 2 shared cores the
client, the server and PostgreSQL compete for CPU: compare runs made under
the same conditions, never figures from different machines. RSS is glibc's
view: after a flood it often stays at the high-water mark (freed memory kept
in arenas); --env MALLOC_ARENA_MAX=1 shows what the server still holds.
"""
