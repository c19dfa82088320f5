"""What a hurried user meets first: a successful stage prints no traceback (pool workers stopped as the
pool closes), small cities and contradicting settings are refused in one line, run.sh answers its own
flags."""
import subprocess
import sys
import textwrap

from script_runner import ROOT, assert_no_traceback

# a stage whose forked worker is stopped with SIGTERM, as multiprocessing.Pool does when it closes
_WORKER_STOPPED = textwrap.dedent("""
    import multiprocessing as mp
    from urbanlens.core import entry

    def wait(ready):
        ready.set()
        mp.Event().wait(30)

    def main():
        ctx = mp.get_context("fork")
        ready = ctx.Event()
        worker = ctx.Process(target=wait, args=(ready,))
        worker.start()
        ready.wait(30)
        worker.terminate()
        worker.join(30)
        print("worker exit", worker.exitcode)

    entry.run(main)
""")


def test_a_worker_stopped_by_its_pool_ends_quietly():
    proc = subprocess.run([sys.executable, "-c", _WORKER_STOPPED], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert_no_traceback(proc)
    assert "worker exit -15" in proc.stdout and "KeyboardInterrupt" not in proc.stderr
