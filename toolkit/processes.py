"""A server process seen from outside, as operators see it: its workers, memory, CPU, files.

Everything is read through psutil. A process that has gone counts as
nothing (no memory, no descriptors): a monitor outliving its server must
not fail for it.
"""

import psutil

MIB = 1024 * 1024


def process_tree(pid: int) -> list[psutil.Process]:
    """`pid` and its descendants (a server may run worker processes: WORKERS); [] once gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def worker_pids(pid: int) -> list[int]:
    """The Python processes under `pid` that serve (its workers), or `pid` itself."""
    workers = [member.pid for member in process_tree(pid)[1:] if _runs_python(member)]
    return workers or [pid]


def _runs_python(process: psutil.Process) -> bool:
    try:
        return "python" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def rss_mb(pid: int) -> float:
    """The resident set of `pid` alone in MiB; 0 once it has gone."""
    try:
        return float(psutil.Process(pid).memory_info().rss) / MIB
    except psutil.Error:
        return 0.0


def tree_rss_mb(pid: int) -> float | None:
    """The resident set of `pid` and its descendants in MiB; None once `pid` has gone."""
    sizes = [_rss_bytes(member) for member in process_tree(pid)]
    present = [size for size in sizes if size is not None]
    return sum(present) / MIB if present else None


def _rss_bytes(process: psutil.Process) -> int | None:
    try:
        return int(process.memory_info().rss)
    except psutil.Error:
        return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time `pid` has used so far; 0 once it has gone."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time `pid` and its descendants have used so far (a PostgreSQL
    server: the postmaster and its backends)."""
    total = 0.0
    for member in process_tree(pid):
        try:
            times = member.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def open_fds(pid: int) -> int:
    """The most file descriptors one process of `pid`'s tree holds.

    The open-file limit is per process: this is what runs into it.
    """
    counts = [0]
    for member in process_tree(pid):
        try:
            counts.append(member.num_fds())
        except psutil.Error:
            continue
    return max(counts)


def open_file_limit(pid: int) -> int:
    """The process's soft open-file limit (RLIMIT_NOFILE)."""
    soft, _ = psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE)
    return int(soft)


def listening_sockets(port: int) -> int:
    """TCP sockets listening on `port`, IPv4 and IPv6 (one per SO_REUSEPORT worker)."""
    return sum(
        1
        for connection in psutil.net_connections(kind="tcp")
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port
    )
