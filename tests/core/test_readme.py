"""README.md stays short and true: at most 250 lines, every relative link of README.md and docs/*.md leads
to a file (and heading) that exists, and every command it shows is a known command with flags that its
--help lists (nothing is run but the --help)."""
import functools
import re
import shlex
import sys
from pathlib import Path

import pytest
from script_runner import ROOT, run
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# what a README command may start with: `bash run.sh ...`, `bash data_setup.sh ...`, `python X.py ...`, `python -m M ...`
COMMAND = re.compile(r"^(bash (run|data_setup)\.sh|python )")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text, fenced = [], False
    for line in page.read_text().splitlines():
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("#"):
            text.append(slug(line.lstrip("#")))
    return set(text)


def links(page: Path) -> list[str]:
    """Targets of the page's Markdown links and images, outside code blocks and code spans."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def commands() -> list[str]:
    """The commands README.md shows: lines of its code blocks and its inline code spans that start as
    COMMAND does (comments and the `[...]` of optional parts dropped)."""
    text = README.read_text()
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        found += [line.split("#")[0].strip() for line in block.splitlines()]
    found += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return [c for c in found if COMMAND.match(c)]


@functools.lru_cache(maxsize=None)
def help_text(*cmd: str) -> str:
    proc = run(cmd, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout + proc.stderr


# prints each script's (or module's, "-m NAME") --help after a "==== TARGET" line, in one process, so the
# libraries they share (torch, geopandas) are imported once
HELPS = """
import contextlib, io, runpy, sys
for target in sys.argv[1:]:
    text = io.StringIO()
    sys.argv = [target.removeprefix("-m "), "--help"]
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        if target.startswith("-m "):
            runpy.run_module(target[3:], run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
    print("==== " + target)
    print(text.getvalue())
"""


def help_texts(targets) -> dict[str, str]:
    """{target: its --help}; a target is a script path or ``-m MODULE``."""
    out = help_text(sys.executable, "-c", HELPS, *sorted(targets))
    parts = re.split(r"^==== (.+)$", out, flags=re.M)[1:]
    return dict(zip(parts[::2], parts[1::2]))


def run_sh_commands() -> set[str]:
    """The commands run.sh accepts (the labels of its first `case "$cmd" in`, which checks them)."""
    block = run_sh_text().split('case "$cmd" in')[1].split("esac")[0]
    return {label for line in block.splitlines() if (m := re.match(r"\s*([\w|-]+)\)", line))
            for label in m.group(1).split("|")}


def run_sh_text() -> str:
    return (ROOT / "run.sh").read_text()


def flags(args: list[str]) -> list[str]:
    return [a.split("=")[0] for a in args if a.startswith("--")]


def test_readme_is_at_most_250_lines():
    assert len(README.read_text().splitlines()) <= 250


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    for target in links(page):
        if re.match(r"^[a-z]+:", target):   # http(s), mailto: not checked here
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link {target} leads to no file"
        if anchor:
            assert anchor in anchors(dest), f"{page.name}: link {target}: no heading '{anchor}' in {dest.name}"


def test_the_readme_links_every_page_of_docs():
    linked = {t.split("#")[0] for t in links(README)}
    assert {f"docs/{p.name}" for p in PAGES[1:]} <= linked


def test_run_sh_help_lists_every_command():
    usage = help_text("bash", "run.sh", "--help")
    # the first column of each line after "usage:", e.g. "(none) | demo", "gpu-check [--cpu-dry-run]"
    columns = [re.split(r"\s{2,}", line.strip())[0] for line in usage.splitlines()[1:] if line.strip()]
    listed = {w for col in columns for w in re.findall(r"[\w-]+", re.sub(r"\[.*?\]", "", col))}
    missing = run_sh_commands() - listed - {"help", "-h", "--help", "-*", "*"}
    assert not missing, f"bash run.sh --help does not list {sorted(missing)}:\n{usage}"


def test_readme_commands_are_known_with_listed_flags():
    shown = commands()
    assert any(c.startswith("bash run.sh") for c in shown) and any(c.startswith("python ") for c in shown)
    targets = {(lambda w: f"-m {w[2]}" if w[1] == "-m" else w[1])(shlex.split(c)) for c in shown if c.startswith("python ")}
    usages = help_texts(targets)
    for command in shown:
        words = shlex.split(re.sub(r"\[[^\]]*\]", "", command))
        if words[:2] == ["bash", "run.sh"]:
            sub = words[2] if len(words) > 2 else "demo"
            if sub.startswith("-"):
                assert sub in ("--help", "-h"), command
                continue
            assert sub in run_sh_commands(), f"{command}: run.sh has no command '{sub}'"
            if sub in ("demo", "cities", "ses", "setup"):
                assert set(flags(words[3:])) <= {"--config", "--set"}, command
            elif sub == "gpu-check":
                usage = help_text(sys.executable, "bench/gpu_check.py", "--help")
                assert all(f in usage for f in flags(words[3:])), command
        elif words[:2] == ["bash", "data_setup.sh"]:
            usage = "\n".join(line for line in (ROOT / "data_setup.sh").read_text().splitlines()
                              if line.startswith("#   bash data_setup.sh"))
            assert all(f in usage for f in flags(words[2:])), f"{command}: data_setup.sh's usage lists {usage}"
        else:
            target = f"-m {words[2]}" if words[1] == "-m" else words[1]
            if words[1] != "-m":
                assert (ROOT / words[1]).is_file(), f"{command}: no script {words[1]}"
            usage = usages[target]
            assert "usage:" in usage, f"{command}: its --help printed no usage:\n{usage}"
            for f in flags(words[2 + (words[1] == "-m"):]):
                assert re.search(rf"(^|[\s\[]){re.escape(f)}\b", usage), f"{command}: {f} is not in its --help"
        for path in [w for w in words if w.startswith("configs/") and "my_" not in w]:
            assert (ROOT / path).is_file(), f"{command}: no {path}"
