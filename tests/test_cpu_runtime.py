"""The CPU runtime under conditions examples miss (issue 12): the instruction-set choice against
the flags the kernels are built for, and every op under UNET_EXT_CPU_ISA=baseline|avx2 and
UNET_EXT_HUGE_PAGES=0; the output cache across fork() (another thread allocating, DataLoader
workers), out of memory, and its RSS after empty_cache(); one OpenMP runtime governed by
torch.set_num_threads; ops called from several Python threads at once. Each case that can hang
or must see a fresh process runs in a subprocess with a timeout."""
import glob
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import unet_ext
from unet_ext import reference
from unet_ext.__main__ import cpu_isa as cli_cpu_isa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = os.path.join(ROOT, "csrc", "ops", "cpu")
# Under scripts/sanitize.sh (ASan's runtime preloaded) freed memory waits in ASan's quarantine and
# its allocator serves the heap: resident-set sizes say nothing about ours there.
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")
rss_test = pytest.mark.skipif(UNDER_ASAN, reason="RSS under AddressSanitizer is its quarantine's, not ours")


def run_python(code, env=None, timeout=120):
    """Runs `code` in a fresh interpreter from the repository root; returns its stdout. An
    LD_PRELOAD in `env` comes after this process's own (scripts/sanitize.sh preloads ASan's
    runtime, which must stay first)."""
    env = dict(os.environ, **(env or {}))
    if os.environ.get("LD_PRELOAD") and env["LD_PRELOAD"] != os.environ["LD_PRELOAD"]:
        env["LD_PRELOAD"] = os.environ["LD_PRELOAD"] + " " + env["LD_PRELOAD"]
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


# ---------------------------------------------------------------------------------------------
# Instruction sets


def _pragma_flags(name):
    text = open(os.path.join(CPU, name)).read()
    return set(re.search(r'#pragma GCC target\("([^"]+)"\)', text).group(1).split(","))


def _checked_flags(function):
    text = open(os.path.join(CPU, "cpu_isa.cpp")).read()
    body = re.search(function + r"\(\) \{(.*?)\n\}", text, re.S).group(1)
    flags = set(re.findall(r'__builtin_cpu_supports\("(\w+)"\)', body))
    if "has_avx2_set()" in body:
        flags |= _checked_flags("has_avx2_set")
    return flags


def test_isa_choice_checks_every_flag_the_kernels_are_built_for():
    """cpu_isa.cpp may pick a kernel only where the processor has every flag of its #pragma
    GCC target (bmi, bmi2, f16c included, not only avx2 and fma)."""
    assert _checked_flags("has_avx2_set") == _pragma_flags("weighted_cross_entropy_avx2.cpp")
    assert _checked_flags("has_avx512_set") == _pragma_flags("weighted_cross_entropy_avx512.cpp")


def test_isa_choice_matches_the_cli_rule_and_the_cap():
    assert torch.ops.unet_ext._cpu_isa() == cli_cpu_isa()[0]


# The ops' forward and backward against unet_ext.reference, run in a fresh process per setting.
ISA_SCRIPT = """
import torch, unet_ext
from unet_ext import ops, reference
torch.manual_seed(0)
def check(fn, ref, *inputs, tol=1e-10):
    a = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    b = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out, want = fn(*a), ref(*b)
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    g = torch.randn_like(want)
    ga = torch.autograd.grad(out, [t for t in a if t.requires_grad], g)
    gb = torch.autograd.grad(want, [t for t in b if t.requires_grad], g)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)
d = torch.float64
for n, c in [(4, 2), (3, 5), (1, 3)]:  # sizes that leave vector remainders
    logits = torch.randn(n, c, 37, 41, dtype=d)
    target = torch.randint(0, c, (n, 37, 41))
    w = torch.rand(n, 37, 41, dtype=d)
    for red in ("mean", "sum", "none"):
        check(lambda l, wm: ops.weighted_cross_entropy(l, target, wm, reduction=red),
              lambda l, wm: reference.weighted_cross_entropy(l, target, wm, reduction=red), logits, w)
    l32 = logits.float()
    out = ops.weighted_cross_entropy(l32, target, w.float())
    torch.testing.assert_close(out, reference.weighted_cross_entropy(l32, target, w.float()), rtol=1e-5, atol=1e-6)
check(ops.crop_concat, reference.crop_concat, torch.randn(2, 3, 40, 41, dtype=d), torch.randn(2, 4, 30, 33, dtype=d))
check(ops.max_pool2x2, lambda x: torch.nn.functional.max_pool2d(x, 2), torch.randn(2, 3, 40, 42, dtype=d))
for pad in (0, 1):
    check(lambda x, w, b: ops.conv2d_relu(x, w, b, pad), lambda x, w, b: reference.conv2d_relu(x, w, b, pad),
          torch.randn(2, 8, 40, 40, dtype=d), torch.randn(6, 8, 3, 3, dtype=d), torch.randn(6, dtype=d))
    check(lambda s, u, w, b: ops.conv2d_relu_concat(s, u, w, b, pad),
          lambda s, u, w, b: reference.conv2d_relu_concat(s, u, w, b, pad),
          torch.randn(2, 4, 44, 44, dtype=d), torch.randn(2, 4, 40, 40, dtype=d),
          torch.randn(6, 8, 3, 3, dtype=d), torch.randn(6, dtype=d))
check(ops.conv_transpose2x2, reference.conv_transpose2x2, torch.randn(2, 8, 20, 24, dtype=d),
      torch.randn(8, 4, 2, 2, dtype=d), torch.randn(4, dtype=d))
# float32 Winograd (the transforms, the few-tiles GEMM and output transform are built per ISA):
# 30x42 outputs are rows of 11 tiles (grouped under 4, 8 and 16 lanes), 80 output channels end a
# part of 64 in 16; both the brgemm and the few-tiles paths, forward, dgrad and wgrad against float64.
import os
def winograd_grads(fn, inputs, allow=True):
    leaves = [t.clone().requires_grad_() for t in inputs]
    with unet_ext.backends.cpu.flags(allow_winograd=allow):
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    return [out, *grads]
winograd_cases = [
    (lambda x, w, b: ops.conv2d_relu(x, w, b, 1), lambda x, w, b: reference.conv2d_relu(x, w, b, 1),
     [torch.randn(2, 64, 30, 42), torch.randn(80, 64, 3, 3) * 0.05, torch.randn(80)]),
    (lambda s, u, w, b: ops.conv2d_relu_concat(s, u, w, b, 0),
     lambda s, u, w, b: reference.conv2d_relu_concat(s, u, w, b, 0),
     [torch.randn(2, 48, 36, 48), torch.randn(2, 48, 32, 44), torch.randn(80, 96, 3, 3) * 0.05, torch.randn(80)]),
]
for few in ("0", "all"):
    os.environ["UNET_EXT_WINOGRAD_FEW_TILES"] = few
    for fn, ref, inputs in winograd_cases:
        got = winograd_grads(fn, inputs)
        exact = winograd_grads(ref, [t.double() for t in inputs])
        stock = winograd_grads(ref, inputs)
        direct = winograd_grads(fn, inputs, allow=False)
        assert not torch.equal(got[0], direct[0])  # Winograd ran
        for g, e, st in zip(got, exact, stock):  # the issue's bar: at most 8x stock float32's error
            assert (g.double() - e).abs().max() <= 8 * (st.double() - e).abs().max() + 1e-6
del os.environ["UNET_EXT_WINOGRAD_FEW_TILES"]
print(torch.ops.unet_ext._cpu_isa())
"""


@pytest.mark.parametrize("env", [{"UNET_EXT_CPU_ISA": "baseline"}, {"UNET_EXT_CPU_ISA": "avx2"},
                                 {"UNET_EXT_HUGE_PAGES": "0"}], ids=lambda e: "-".join(e.values()))
def test_every_op_under_each_isa_and_without_huge_pages(env):
    chosen = run_python(ISA_SCRIPT, env).split()[-1]
    if env.get("UNET_EXT_CPU_ISA") == "baseline":
        assert chosen == "baseline"
    elif env.get("UNET_EXT_CPU_ISA") == "avx2":
        assert chosen in ("avx2", "baseline")  # baseline on a processor without the AVX2 set


# ---------------------------------------------------------------------------------------------
# The output cache: fork, out of memory, RSS


# In the scripts below: waits for a forked child. A child that is blocked (neither runnable nor in
# uninterruptible sleep) and has used no CPU time for `stall` seconds is hung: a deadlock, which
# never resolves. A child that runs, however slowly (its fork and exit copy and free a large
# address space: 0.2-0.6 s each with two busy loops on the 2-core machine), is waited for, up to
# `cap` seconds. Prints nothing; returns the child's wall time, or None if it hung (then killed).
WAIT_CHILD = """
def wait_child(pid, stall=5.0, cap=120.0):
    import os, signal, time
    start = last_progress = time.time()
    last_cpu = -1
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0, status
            return time.time() - start
        try:
            fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        now, cpu = time.time(), int(fields[11]) + int(fields[12])
        if fields[0] in "RDZ" or cpu != last_cpu:
            last_progress, last_cpu = now, cpu
        if now - last_progress > stall or now - start > cap:
            import shutil, subprocess
            if shutil.which("gdb"):  # where it hangs, for the assertion's message
                bt = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt"],
                                    capture_output=True, text=True, timeout=120).stdout
                print(chr(10).join(l[:160] for l in bt.splitlines() if l.startswith("#"))[:3000])
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.001)
"""


def test_fork_while_another_thread_allocates_does_not_deadlock_the_child():
    """A child forked while another thread holds the cache's lock must still allocate (the lock
    is held across fork() by pthread_atfork handlers). The other threads cycle through many
    output sizes, so the 512 MiB cache keeps evicting (unmapping under its lock)."""
    out = run_python(WAIT_CHILD + """
import os, threading, torch, unet_ext
from unet_ext.ops import conv2d_bias, crop_concat
# channels_last inputs: the op frees its NCHW result inside C++ (no GIL held); 8-72 MiB
# (1.3 GiB in all) overflow the 512 MiB cache, so that free unmaps evicted blocks under
# the cache's lock, a window in which the main thread forks.
w = torch.ones(2, 2, 1, 1)
stop = False
def churn():
    while not stop:
        for k in range(8, 73, 2):
            x = torch.empty(1, 2, 256, 512 * k, memory_format=torch.channels_last)
            conv2d_bias(x, w, None, 0)
def child_work():
    # One thread, as DataLoader workers: libgomp itself is not fork-safe while
    # other threads' OpenMP teams are busy (stock torch ops hang there too).
    torch.set_num_threads(1)
    x = torch.zeros(1, 1, 256, 8192)
    crop_concat(x, x[:, :0]); crop_concat(x, x)
# The child's path once here first: its first torch.set_num_threads builds torch's pthreadpool,
# whose static registers an atexit destructor, and glibc's atexit lock is not reset in a child:
# forked while a churn thread was registering one (a first-time static), the child hung there
# (1 in 30 runs under load; torch's and glibc's, not the cache's).
n = torch.get_num_threads()
child_work()
torch.set_num_threads(n)
threads = [threading.Thread(target=churn) for _ in range(2)]
for t in threads: t.start()
hung, times = 0, []
for _ in range(30):
    pid = os.fork()
    if pid == 0:
        child_work()
        os._exit(0)
    took = wait_child(pid)
    if took is None:
        hung += 1
        break
    times.append(took)
stop = True
for t in threads: t.join()
print("slowest %.2f s" % max(times or [0]))
print("hung", hung)
    """, timeout=900)
    assert out.split()[-1] == "0", out


ATFORK_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
/* Fork handlers registered from a thread other than the main one take a second longer. */
int __register_atfork(void (*prepare)(void), void (*parent)(void), void (*child)(void), void* dso) {
  static int (*real)(void (*)(void), void (*)(void), void (*)(void), void*);
  if (!real) real = (int (*)(void (*)(void), void (*)(void), void (*)(void), void*))
                        dlvsym(RTLD_NEXT, "__register_atfork", "GLIBC_2.3.2");
  if (syscall(SYS_gettid) != getpid()) {
    struct timespec second = {1, 0};
    nanosleep(&second, 0);
  }
  return real(prepare, parent, child, dso);
}
"""


def test_fork_during_the_first_big_output_does_not_deadlock_the_child(tmp_path):
    """The output cache was built, and its fork handlers registered, by the first big output: a
    child forked while another thread was inside that first call waited forever on the static's
    guard (__cxa_guard_acquire) in its own first big output. Registering waits for the handlers
    of a concurrent fork, so under load the window is as long as a fork. A shim makes every
    registration from another thread take a second; the cache must be ready before."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not os.path.exists("/proc/self/stat"):
        pytest.skip("needs a C compiler and /proc")
    (tmp_path / "shim.c").write_text(ATFORK_SHIM)
    (tmp_path / "shim.map").write_text("GLIBC_2.3.2 { global: __register_atfork; local: *; };\n")
    shim = str(tmp_path / "libshim.so")
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wl,--version-script=" + str(tmp_path / "shim.map"),
                    "-o", shim, str(tmp_path / "shim.c"), "-ldl"], check=True)
    out = run_python(WAIT_CHILD + """
import os, threading, time, torch, unet_ext
from unet_ext.ops import crop_concat
torch.set_num_threads(torch.get_num_threads())  # torch's pthreadpool built here (see above)
x = torch.zeros(1, 1, 256, 8192)  # outputs of 16 MiB: the output cache's
first = threading.Thread(target=lambda: crop_concat(x, x))  # the process's first big output
first.start()
time.sleep(0.3)  # inside it, if it builds the cache (its registration takes a second)
pid = os.fork()
if pid == 0:
    torch.set_num_threads(1)
    crop_concat(x, x)
    os._exit(0)
print("hung", int(wait_child(pid) is None))
first.join()
    """, env={"LD_PRELOAD": shim})
    assert out.split()[-1] == "0", out


SLOW_FREE_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <malloc.h>
#include <time.h>
/* Freeing a block of 4 MiB or more takes 50 ms longer: whoever frees one under a lock holds
   that lock for as long. */
static void (*real_free)(void*);
__attribute__((constructor)) static void find_free(void) { real_free = (void (*)(void*))dlsym(RTLD_NEXT, "free"); }
void free(void* p) {
  if (!real_free) return;  /* dlsym's own allocations, before it returns: kept */
  if (p && malloc_usable_size(p) >= (4u << 20)) {
    struct timespec wait = {0, 50000000};
    nanosleep(&wait, 0);
  }
  real_free(p);
}
"""


def test_fork_while_another_thread_uses_the_winograd_filter_cache(tmp_path):
    """No-grad Winograd convolutions keep transformed filters in a cache under a lock (DataLoader
    workers forked while the main thread runs inference). A child forked while another thread held
    that lock waited on it forever in its first no-grad Winograd conv; dropping entries also freed
    their filters under it. The lock is now held across fork() and nothing is freed under it. A
    shim makes every large free take 50 ms, so a thread that frees under the lock holds it that long."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not os.path.exists("/proc/self/stat"):
        pytest.skip("needs a C compiler and /proc")
    (tmp_path / "shim.c").write_text(SLOW_FREE_SHIM)
    shim = str(tmp_path / "libslowfree.so")
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", shim, str(tmp_path / "shim.c"), "-ldl"], check=True)
    out = run_python(WAIT_CHILD + """
import os, threading, time, torch, unet_ext
from unet_ext.ops import conv2d_relu
torch.manual_seed(0)
x = torch.randn(1, 256, 34, 34)  # 256 -> 256 channels, 81 tiles: Winograd, filters cached (9.4 MB)
def conv(w):
    with torch.no_grad():
        return conv2d_relu(x, w, None, 1)
# The child's weight is made here: torch's random generator has a lock of its own, which the
# churn thread's randn may hold at fork (torch's, not ours).
child_weight = torch.randn(256, 256, 3, 3)
def child_work():
    torch.set_num_threads(1)  # one thread, as DataLoader workers (see the test above)
    conv(child_weight.clone())  # a new weight: its filters are transformed and cached in the child
n = torch.get_num_threads()
child_work()  # the child's path once here first (statics, torch's thread pool)
torch.set_num_threads(n)
stop = False
def churn():
    while not stop:
        weights = [torch.randn(256, 256, 3, 3) for _ in range(4)]
        for w in weights:
            conv(w)
        del weights  # the next call drops their four cache entries
thread = threading.Thread(target=churn)
thread.start()
hung = 0
for _ in range(10):
    time.sleep(0.05)
    pid = os.fork()
    if pid == 0:
        child_work()
        os._exit(0)
    if wait_child(pid) is None:
        hung += 1
        break
stop = True
thread.join()
print("hung", hung)
    """, env={"LD_PRELOAD": shim, "UNET_EXT_HUGE_PAGES": "0"}, timeout=600)
    assert out.split()[-1] == "0", out


def test_fork_while_another_thread_records_weights_in_the_winograd_cache():
    """The fork handler takes the Winograd cache's lock with the GIL held (os.fork). Code under
    that lock must never take the GIL: it did, through weak_intrusive_ptr::lock() on a cached
    weight that only Python still held (torch 2.14's PyObject preservation increfs the PyObject,
    under the GIL), and CI's parent process hung in the fork handler while the other thread
    waited for the GIL inside the lock. Here a thread records a new weight version per call
    (no-grad forward, 32 -> 32 channels: the record is taken, the conv is small) with 40 earlier
    weights alive in Python, while the main thread forks 300 times. A hang is the timeout."""
    out = run_python("""
import os, threading, torch, unet_ext
from unet_ext.ops import conv2d_relu
x = torch.randn(1, 32, 10, 10)
alive = [torch.randn(32, 32, 3, 3) for _ in range(40)]
stop = False
def churn():
    while not stop:
        w = torch.randn(32, 32, 3, 3)
        with torch.no_grad():
            conv2d_relu(x, w, None, 0)
        alive.append(w)
        alive.pop(0)
thread = threading.Thread(target=churn)
thread.start()
for _ in range(300):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
stop = True
thread.join()
print("forks", 300)
    """, timeout=120)
    assert out.split()[-1] == "300", out


def test_dataloader_workers_running_the_ops():
    """Forked DataLoader workers (persistent, across epochs) run the ops on big outputs while the
    parent runs them too; every batch equals the serial result."""
    run_python("""
        import torch, unet_ext
        from unet_ext.ops import crop_concat, max_pool2x2
        class Ops(torch.utils.data.Dataset):
            def __len__(self): return 8
            def __getitem__(self, i):
                g = torch.Generator().manual_seed(i)
                x = torch.randn(16, 128, 130, generator=g)
                return max_pool2x2(crop_concat(x[None], x[None]))[0]  # exact: no sums
        data = Ops()
        serial = torch.stack([data[i] for i in range(len(data))])
        loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=2, persistent_workers=True,
                                             multiprocessing_context="fork")
        for epoch in range(3):
            got = torch.cat([b for b in loader])
            crop_concat(torch.randn(1, 16, 128, 130), torch.randn(1, 16, 128, 130))
            torch.testing.assert_close(got, serial, rtol=0, atol=0)
    """, timeout=300)


def test_out_of_memory_empties_the_cache_and_retries():
    """With the address space capped, a new output size that fits only once the cached blocks
    are given back still succeeds."""
    run_python("""
        import resource, torch, unet_ext
        from unet_ext.ops import crop_concat
        mib = 1 << 20
        def vm():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize"))
        out = crop_concat(torch.zeros(1, 1, 1, 400 * mib // 4), torch.zeros(1, 0, 1, 400 * mib // 4))
        del out  # a 400 MiB block now sits in the cache
        limit = vm() + 700 * mib
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        # 2 x 220 MiB inputs + a 440 MiB output (880 MiB) fit only once the 400 MiB are unmapped.
        a = torch.zeros(1, 1, 1, 220 * mib // 4)
        b = torch.zeros(1, 1, 1, 220 * mib // 4)
        out = crop_concat(a, b)
        assert out.shape[1] == 2
    """)


@rss_test
def test_rss_returns_after_empty_cache_for_blocks_of_2_to_32_mib():
    """Outputs of 2-32 MiB (what glibc's heap serves once its mmap threshold has grown) are given
    back to the system by empty_cache()."""
    out = run_python("""
        import torch, unet_ext
        from unet_ext.ops import conv_transpose2x2
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096 / 2**20
        w = torch.ones(1, 64, 2, 2)
        for _ in range(2):  # warm up torch and the kernels
            conv_transpose2x2(torch.ones(1, 1, 8, 8), w)
        unet_ext.empty_cache()
        base = rss()
        # Rounds: freed blocks raise glibc's mmap threshold, so later rounds would come from its heap.
        for _ in range(3):
            kept = []
            for mib in range(2, 33, 2):   # output = 64 * 4 * H * W floats = mib MiB
                side = int((mib * 2**20 / 4 / 256) ** 0.5)
                kept.append(conv_transpose2x2(torch.ones(1, 1, side, side), w))
            peak = rss()
            del kept
            unet_ext.empty_cache()
        print(base, peak, rss())
    """)
    base, peak, after = map(float, out.split())
    assert peak - base > 200, out  # the outputs were resident
    assert after - base < 24, out


@rss_test
def test_empty_cache_gives_back_the_conv_scratch():
    """The conv kernels keep per-thread scratch between calls (gemm.h); empty_cache() frees it."""
    out = run_python("""
        import torch, unet_ext
        from unet_ext.ops import conv2d_relu
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096 / 2**20
        torch.set_num_threads(1)
        w = torch.randn(4, 128, 3, 3, dtype=torch.float64)
        conv2d_relu(torch.randn(1, 128, 3, 30, dtype=torch.float64), w, None, 1)  # code paged in
        unet_ext.empty_cache()
        base = rss()
        x = torch.randn(1, 128, 3, 20000, dtype=torch.float64)  # a ~60 MB input window
        y = conv2d_relu(x, w, None, 1)
        del x, y
        used = rss()
        unet_ext.empty_cache()
        print(base, used, rss())
    """)
    base, used, after = map(float, out.split())
    assert used - base > 30, out  # the scratch was resident
    assert after - base < 8, out


# ---------------------------------------------------------------------------------------------
# Threads


SYSTEM_GOMP = "/usr/lib/x86_64-linux-gnu/libgomp.so.1"


@pytest.mark.parametrize("preload", [None, pytest.param(SYSTEM_GOMP, marks=pytest.mark.skipif(
    not os.path.exists(SYSTEM_GOMP), reason="no system libgomp"))], ids=["torch-gomp", "system-gomp-first"])
def test_one_openmp_runtime_governed_by_torch_set_num_threads(preload):
    """The extension links -fopenmp; its parallel regions must run on the same OpenMP runtime as
    torch's (also when another libgomp is loaded first) with torch's thread count, and per-thread
    partial sums (sized from at::get_num_threads, indexed by at::get_thread_num) must give the
    same result for any count, more threads than cores too."""
    env = {"OMP_NUM_THREADS": "1"}
    if preload:
        env["LD_PRELOAD"] = preload
    out = run_python("""
        import os, torch, unet_ext
        from unet_ext.ops import conv2d_relu
        maps = open("/proc/self/maps").read()
        print(len({l.split()[-1] for l in maps.splitlines() if "gomp" in l or "iomp" in l}))
        def threads():
            return len(os.listdir("/proc/self/task"))
        x = torch.randn(2, 8, 64, 64, requires_grad=True)
        w = torch.randn(8, 8, 3, 3, requires_grad=True)
        results = []
        for n in (1, 3, 5):
            torch.set_num_threads(n)
            before = threads()
            y = conv2d_relu(x, w, None, 1)
            gx, gw = torch.autograd.grad(y.sum(), (x, w))
            results.append((y, gx, gw))
            print(n, before, threads())
        for r in results[1:]:
            for a, b in zip(results[0], r):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    """, env=env)
    lines = out.splitlines()
    assert lines[0] == "1", out  # one OpenMP runtime mapped
    counts = {int(n): (int(b), int(a)) for n, b, a in (l.split() for l in lines[1:])}
    assert counts[1][1] == counts[1][0], out  # one thread: no OpenMP team was started
    assert counts[5][1] >= counts[1][1] + 4, out  # five threads: a team of four more



def _openmp_runtimes():
    """Other OpenMP runtimes on this machine: Intel's (pip `intel-openmp`, which scripts/setup.sh
    installs; MKL builds of numpy bring it too), LLVM's (Debian `libomp5`), and any paths in
    UNET_EXT_TEST_OPENMP_RUNTIMES (colon-separated)."""
    candidates = [os.path.join(sys.prefix, "lib", "libiomp5.so"), "/usr/lib/x86_64-linux-gnu/libomp.so.5"]
    candidates += sorted(glob.glob("/usr/lib/llvm-*/lib/libomp.so.5"))[-1:]
    candidates += [p for p in os.environ.get("UNET_EXT_TEST_OPENMP_RUNTIMES", "").split(":") if p]
    found = {}
    for path in candidates:
        if os.path.exists(path):
            found.setdefault(os.path.realpath(path), path)
    return list(found.values())


OTHER_RUNTIMES = _openmp_runtimes()


@pytest.mark.parametrize("runtime", OTHER_RUNTIMES or [pytest.param(None, marks=pytest.mark.skip(
    reason="no other OpenMP runtime here: pip install intel-openmp (scripts/setup.sh does), apt-get install "
           "libomp5, or name one in UNET_EXT_TEST_OPENMP_RUNTIMES"))],
    ids=lambda path: os.path.basename(path) if path else "none")
def test_ops_with_another_openmp_runtime_loaded_first(runtime):
    """Intel's or LLVM's OpenMP runtime preloaded (both export libgomp's GOMP_* entry points, so
    torch's and our parallel regions run on it), OMP_NUM_THREADS=5 and torch.set_num_threads at
    other counts: every op's forward and backward equals the float64 reference, in every count."""
    out = run_python("""
        import os, torch
        maps = open("/proc/self/maps").read()
        print("mapped", int(%r in maps))
        script = %r
        for n in (3, 1, 2):
            torch.set_num_threads(n)
            exec(script, {})
            print("threads", n, len(os.listdir("/proc/self/task")))
    """ % (os.path.realpath(runtime), ISA_SCRIPT), env={"LD_PRELOAD": runtime, "OMP_NUM_THREADS": "5"}, timeout=300)
    assert "mapped 1" in out, out
    tasks = {int(n): int(t) for n, t in re.findall(r"threads (\d) (\d+)", out)}
    assert tasks[3] >= 3, out  # a team ran (the main thread and two more, at least)


SHIM = r"""
/* torch's thread count pinned at 2 (what at::get_num_threads reads) while the runtime that runs
   the parallel regions keeps OMP_NUM_THREADS: a team larger than torch's count, as where another
   OpenMP runtime answers torch's omp_get_max_threads or our regions run on another runtime. */
int omp_get_max_threads(void) { return 2; }
void omp_set_num_threads(int n) { (void)n; }
"""


def test_per_thread_buffers_with_a_team_larger_than_torchs_thread_count(tmp_path):
    """Per-thread partial sums sized from at::get_num_threads() and indexed by the OpenMP thread
    number ran past their end when the team is larger (IndexError from the conv backward before
    partials.h). With torch's count pinned at 2 and teams of 4, every op's results equal the
    float64 reference (computed here, outside the pinned process: torch's own at::parallel_reduce
    indexes its buffers that way too)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the OpenMP shim")
    (tmp_path / "shim.c").write_text(SHIM)
    (tmp_path / "shim.map").write_text("OMP_1.0 { global: omp_get_max_threads; omp_set_num_threads; local: *; };\n")
    shim = str(tmp_path / "libshim.so")
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wl,--version-script=" + str(tmp_path / "shim.map"),
                    "-o", shim, str(tmp_path / "shim.c")], check=True)
    g = torch.Generator().manual_seed(0)
    d = torch.float64
    cases = {
        "conv2d_relu": (lambda x, w, b: reference.conv2d_relu(x, w, b, 1),
                        [torch.randn(8, 8, 40, 40, dtype=d, generator=g), torch.randn(6, 8, 3, 3, dtype=d, generator=g),
                         torch.randn(6, dtype=d, generator=g)]),
        "conv2d_relu_concat": (lambda s, u, w, b: reference.conv2d_relu_concat(s, u, w, b, 0),
                               [torch.randn(4, 4, 44, 44, dtype=d, generator=g),
                                torch.randn(4, 4, 40, 40, dtype=d, generator=g),
                                torch.randn(6, 8, 3, 3, dtype=d, generator=g), torch.randn(6, dtype=d, generator=g)]),
        "conv_transpose2x2": (reference.conv_transpose2x2,
                              [torch.randn(8, 8, 20, 24, dtype=d, generator=g),
                               torch.randn(8, 4, 2, 2, dtype=d, generator=g), torch.randn(4, dtype=d, generator=g)]),
    }
    inputs = {name: [t.contiguous() for t in ts] for name, (_, ts) in cases.items()}
    torch.save(inputs, tmp_path / "inputs.pt")
    out = run_python("""
        import os, torch, unet_ext
        from unet_ext import ops
        inputs = torch.load(os.environ["INPUTS"])
        tasks = len(os.listdir("/proc/self/task"))
        results = {}
        for name, ts in inputs.items():
            fn = {"conv2d_relu": lambda x, w, b: ops.conv2d_relu(x, w, b, 1),
                  "conv2d_relu_concat": lambda s, u, w, b: ops.conv2d_relu_concat(s, u, w, b, 0),
                  "conv_transpose2x2": ops.conv_transpose2x2}[name]
            ts = [t.clone().requires_grad_() for t in ts]
            y = fn(*ts)
            y.backward(torch.ones_like(y))
            results[name] = [y.detach()] + [t.grad for t in ts]
        unet_ext.empty_cache()
        torch.save(results, os.environ["RESULTS"])
        print(torch.get_num_threads(), len(os.listdir("/proc/self/task")) - tasks)
    """, env={"LD_PRELOAD": shim, "OMP_NUM_THREADS": "4", "INPUTS": str(tmp_path / "inputs.pt"),
              "RESULTS": str(tmp_path / "out.pt")})
    count, started = map(int, out.split()[-2:])
    assert count == 2 and started >= 3, out  # torch says 2 threads; the regions ran on teams of 4
    results = torch.load(tmp_path / "out.pt")
    for name, (ref, _) in cases.items():
        ts = [t.clone().requires_grad_() for t in inputs[name]]
        y = ref(*ts)
        y.backward(torch.ones_like(y))
        for got, want in zip(results[name], [y.detach()] + [t.grad for t in ts]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)


OPS_CASES = {
    "crop_concat": (unet_ext.ops.crop_concat, reference.crop_concat,
                    lambda g: (torch.randn(2, 3, 40, 41, generator=g), torch.randn(2, 4, 30, 33, generator=g))),
    "max_pool2x2": (unet_ext.ops.max_pool2x2, lambda x: torch.nn.functional.max_pool2d(x, 2),
                    lambda g: (torch.randn(2, 3, 64, 66, generator=g),)),
    "conv2d_relu": (lambda x, w: unet_ext.ops.conv2d_relu(x, w, None, 1),
                    lambda x, w: reference.conv2d_relu(x, w, None, 1),
                    lambda g: (torch.randn(2, 8, 40, 40, generator=g), torch.randn(6, 8, 3, 3, generator=g))),
    "conv_transpose2x2": (unet_ext.ops.conv_transpose2x2, reference.conv_transpose2x2,
                          lambda g: (torch.randn(2, 8, 20, 24, generator=g), torch.randn(8, 4, 2, 2, generator=g))),
    "weighted_cross_entropy": (
        lambda l, t, w: unet_ext.ops.weighted_cross_entropy(l, t, w),
        reference.weighted_cross_entropy,
        lambda g: (torch.randn(2, 3, 50, 50, generator=g), torch.randint(0, 3, (2, 50, 50), generator=g),
                   torch.rand(2, 50, 50, generator=g))),
}


@pytest.mark.parametrize("name", list(OPS_CASES))
def test_ops_from_several_threads_equal_serial_results(name):
    fn, _, make = OPS_CASES[name]
    inputs = [make(torch.Generator().manual_seed(seed)) for seed in range(6)]

    def run(args):
        leaves = [a.clone().requires_grad_(a.is_floating_point()) for a in args]
        out = fn(*leaves)
        grads = torch.autograd.grad(out.sum(), [l for l in leaves if l.requires_grad])
        return [out.detach(), *grads]

    serial = [run(args) for args in inputs]
    results, errors = {}, []

    def worker(k):
        try:
            for repeat in range(5):
                for i in range(k % 2, len(inputs), 1):
                    results[(k, repeat, i)] = run(inputs[i])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (_, _, i), got in results.items():
        for a, b in zip(got, serial[i]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_output_cache_under_concurrent_allocation_and_cross_thread_frees():
    """Big outputs made in some threads and freed in others (a queue between them): the cache
    hands every block to one owner only (contents survive until freed)."""
    import queue

    from unet_ext.ops import crop_concat

    handoff, errors = queue.Queue(maxsize=8), []
    skip = torch.randn(1, 8, 128, 256)

    def producer(k):
        try:
            for i in range(40):
                out = crop_concat(skip + k, skip + i)
                handoff.put((k, i, out))
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    def consumer(count):
        try:
            for _ in range(count):
                k, i, out = handoff.get()
                assert torch.equal(out[:, :8], skip + k) and torch.equal(out[:, 8:], skip + i)
                del out  # freed in this thread, allocated in another
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=producer, args=(k,)) for k in range(3)]
    threads += [threading.Thread(target=consumer, args=(60,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
