#!/usr/bin/env python3
"""Turns `perf script` output of raw_syscalls and sched events (see
`SCHED=1 bench/profile.sh`) into the path of concurrency-1 requests.

    timeline.py sched.txt loadgen=PID gateway=PID node=PID upstream=PID [--dump K]

A request starts at the load generator's write and ends at its next one.
Inside it, every system call that moved data (a read that returned bytes, a
write) is a step; requests with the same sequence of steps are grouped, and
for the commonest sequence the median time of each step is printed, with the
time since the step before: that is where a request's time goes. `--dump K`
also lists everything the K-th request did (calls, switches, wake-ups);
`--slowest N` names the N slowest requests (the tail), to dump one of them."""
import collections
import re
import statistics
import sys

NAMES = {0: 'read', 1: 'write', 7: 'poll', 17: 'pread64', 18: 'pwrite64', 19: 'readv', 20: 'writev', 44: 'sendto',
         45: 'recvfrom', 46: 'sendmsg', 47: 'recvmsg', 232: 'epoll_wait', 281: 'epoll_pwait', 202: 'futex',
         72: 'fcntl', 75: 'fdatasync', 74: 'fsync', 24: 'sched_yield', 8: 'lseek', 5: 'fstat', 262: 'newfstatat',
         4: 'stat', 228: 'clock_gettime', 13: 'rt_sigaction', 28: 'madvise', 9: 'mmap', 11: 'munmap', 3: 'close',
         16: 'ioctl', 441: 'epoll_pwait2', 291: 'epoll_create1', 233: 'epoll_ctl', 35: 'nanosleep', 230: 'clock_nanosleep',
         285: 'fallocate', 77: 'ftruncate', 10: 'mprotect', 25: 'mremap', 12: 'brk', 318: 'getrandom'}
WRITES = {'write', 'writev', 'sendto', 'sendmsg', 'pwrite64'}
READS = {'read', 'readv', 'recvfrom', 'recvmsg'}
LINE = re.compile(r'^\s*(.+?)\s+(\d+)/(\d+)\s+\[(\d+)\]\s+(\d+\.\d+):\s+(\S+):\s*(.*)$')


def main():
    args = [a for a in sys.argv[2:] if '=' in a]
    dump = None
    if '--dump' in sys.argv:
        dump = int(sys.argv[sys.argv.index('--dump') + 1])
    slowest = int(sys.argv[sys.argv.index('--slowest') + 1]) if '--slowest' in sys.argv else 0
    roles = {int(p): r for r, p in (a.split('=') for a in args) if p}
    by_tid = {}
    events = []  # (start, end, role, tid, what, detail)
    entered = {}
    for line in open(sys.argv[1], errors='replace'):
        m = LINE.match(line)
        if not m:
            continue
        comm, pid, tid, _cpu, ts, ev, rest = m.groups()
        pid, tid, ts = int(pid), int(tid), float(ts)
        if ev == 'sched:sched_wakeup':
            wpid = re.search(r'pid=(\d+)', rest)
            events.append((ts, ts, roles.get(pid, comm.strip()), tid, 'wakes', wpid.group(1) if wpid else '?'))
            continue
        if ev == 'sched:sched_switch':
            nxt = re.search(r'next_comm=(.*?) next_pid=(\d+)', rest)
            prev_state = re.search(r'prev_state=(\S+)', rest)
            events.append((ts, ts, roles.get(pid, comm.strip()), tid, 'switch',
                           f'{prev_state.group(1) if prev_state else "?"} -> {nxt.group(2) if nxt else "?"}'))
            continue
        if pid not in roles:
            continue
        role = roles[pid]
        by_tid[tid] = f'{role}/{comm.strip()}'
        nr = int(re.search(r'NR (\d+)', rest).group(1))
        if ev == 'raw_syscalls:sys_enter':
            fd = re.search(r'\((\w+)', rest)
            entered[tid] = (ts, int(fd.group(1), 16) if fd else -1)
        elif ev == 'raw_syscalls:sys_exit':
            ret = int(re.search(r'= (-?\d+)', rest).group(1))
            start, fd = entered.pop(tid, (ts, -1))
            events.append((start, ts, role, tid, NAMES.get(nr, f'nr{nr}'), f'fd {fd} = {ret}'))
    events.sort()
    # An 8-byte write is a wake-up through an eventfd, not data.
    events = [e for e in events if not (e[4] == 'write' and e[5].endswith('= 8'))]
    starts = [e[0] for e in events if e[2] == 'loadgen' and e[4] in WRITES]
    groups = collections.defaultdict(list)
    lengths = []
    for i in range(1, len(starts) - 1):
        t0, t1 = starts[i], starts[i + 1]
        lengths.append(((t1 - t0) * 1e6, i))
        window = [e for e in events if t0 <= e[0] < t1]
        # The store's own threads (credit writer, WAL copier) work beside the
        # request's path, not on it, so their calls are not steps.
        steps = [e for e in window if (e[4] in WRITES or (e[4] in READS and not e[5].endswith('= -11')
                                                              and not e[5].endswith('= 0')))
                 and '/cxmpute-' not in by_tid.get(e[3], '')]
        key = tuple((e[2], e[4]) for e in steps)
        groups[key].append([(e[1] - t0) * 1e6 for e in steps] + [(t1 - t0) * 1e6])
        if dump is not None and i == dump:
            print(f'-- request {i}')
            for e in window:
                who = by_tid.get(e[3], e[2])
                dur = (e[1] - e[0]) * 1e6
                print(f'{(e[0] - t0) * 1e6:9.1f} {dur:7.1f}  {who + " " + str(e[3]):38s} {e[4]:12s} {e[5]}')
    if slowest:
        print(f'the {slowest} slowest requests (us, index):',
              ', '.join(f'{d:.0f} #{i}' for d, i in sorted(lengths, reverse=True)[:slowest]))
    total = sum(len(v) for v in groups.values())
    key, runs = max(groups.items(), key=lambda kv: len(kv[1]))
    print(f'{total} requests; the commonest path ({len(runs)} of them), median time at the end of each step:')
    prev = 0.0
    for k, (role, call) in enumerate(key):
        med = statistics.median(r[k] for r in runs)
        print(f'{k:3d}  {role:9s} {call:9s} {med:8.1f} us  (+{med - prev:6.1f})')
        prev = med
    med = statistics.median(r[-1] for r in runs)
    print(f'     next request     {med:8.1f} us  (+{med - prev:6.1f})')


main()
