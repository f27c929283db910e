"""A fresh clone must work: no tracked path that .gitignore ignores, no tracked symlink leaving the
repository, and scripts/setup_env.sh copes with whatever a checkout holds at the env path. The code
stays readable: lint and format clean, no pointers out of the repository, no function over 60 lines."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "scripts" / "setup_env.sh"


def _git(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def _checkout_root() -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    out = _git("rev-parse", "--show-toplevel")
    if out.returncode != 0:
        pytest.skip("not a git checkout (e.g. an sdist): nothing tracked to check")
    return Path(out.stdout.strip())


def tracked_ignored(root: Path) -> list[str]:
    """Tracked paths that .gitignore ignores (a fresh clone gets them although they are machine-local)."""
    out = _git("ls-files", "-ci", "--exclude-standard", cwd=root)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line]


def tracked_symlinks_leaving(root: Path) -> list[str]:
    """Tracked symlinks (git mode 120000) whose target resolves outside the checkout."""
    out = _git("ls-files", "-s", cwd=root)
    assert out.returncode == 0, out.stderr
    bad = []
    real_root = root.resolve()
    for line in out.stdout.splitlines():
        meta, _, path = line.partition("\t")
        if meta.split()[0] != "120000":
            continue
        blob = meta.split()[1]
        target = _git("cat-file", "blob", blob, cwd=root).stdout
        resolved = Path(os.path.normpath((root / path).parent / target))
        if os.path.isabs(target) or not resolved.is_relative_to(real_root):
            bad.append(f"{path} -> {target}")
    return bad


def test_no_tracked_path_is_ignored():
    root = _checkout_root()
    assert tracked_ignored(root) == [], "remove these from the index (git rm --cached): they are machine-local"


def test_no_tracked_symlink_leaves_the_repository():
    root = _checkout_root()
    assert tracked_symlinks_leaving(root) == [], "these links are broken on every other machine"


def _repo_with_tracked_venv_link(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    (repo / "a.py").write_text("x = 1\n")
    os.symlink("/nonexistent/venvs/avs", repo / ".venv")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["init", "-q"], ["add", "-f", ".gitignore", "a.py", ".venv"], ["commit", "-q", "-m", "x"]):
        out = subprocess.run(["git", *cmd], cwd=repo, capture_output=True, text=True, env={**os.environ, **env})
        assert out.returncode == 0, out.stderr
    return repo


def test_checks_catch_a_tracked_venv_symlink(tmp_path):
    """The two checks above fail on a checkout that tracks a .venv link to a machine-local env."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = _repo_with_tracked_venv_link(tmp_path)
    assert tracked_ignored(repo) == [".venv"]
    assert tracked_symlinks_leaving(repo) == [".venv -> /nonexistent/venvs/avs"]
    _git("rm", "-q", "--cached", ".venv", cwd=repo)
    assert tracked_ignored(repo) == [] and tracked_symlinks_leaving(repo) == []


# ----------------------------------------------------------------------------- setup_env.sh decisions
def _plan(venv: Path, min_free_gb: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "AVS_VENV": str(venv)}
    if min_free_gb is not None:
        env["AVS_MIN_FREE_GB"] = min_free_gb
    return subprocess.run(["bash", str(SETUP), "--plan"], capture_output=True, text=True, env=env, timeout=60)


def _make_venv(path: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)


def test_setup_env_creates_when_nothing_is_there(tmp_path):
    out = _plan(tmp_path / "env")
    assert out.returncode == 0 and "plan: create" in out.stdout


def test_setup_env_reuses_a_working_venv(tmp_path):
    _make_venv(tmp_path / "env")
    out = _plan(tmp_path / "env")
    assert out.returncode == 0 and "plan: reuse" in out.stdout
    os.symlink(tmp_path / "env", tmp_path / "link")  # a link to a working env is as good
    assert "plan: reuse" in _plan(tmp_path / "link").stdout


def test_setup_env_recovers_from_a_dangling_link(tmp_path):
    os.symlink(tmp_path / "gone", tmp_path / "env")
    out = _plan(tmp_path / "env")
    assert out.returncode == 0 and "plan: relink" in out.stdout
    assert "dangling symlink" in out.stdout and str(tmp_path / "gone") in out.stdout


def test_setup_env_never_touches_a_users_folder(tmp_path):
    folder = tmp_path / "env"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    out = _plan(folder)
    assert out.returncode == 2
    assert "did not make it" in out.stderr and "AVS_VENV" in out.stderr
    assert (folder / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    assert _plan(tmp_path / "file").returncode == 2


def test_setup_env_recreates_its_own_broken_venv(tmp_path):
    folder = tmp_path / "env"
    (folder / "bin").mkdir(parents=True)
    (folder / ".avs-setup-env").write_text("made by scripts/setup_env.sh")
    os.symlink(tmp_path / "no-python", folder / "bin" / "python")
    out = _plan(folder)
    assert out.returncode == 0 and "plan: recreate" in out.stdout


def test_setup_env_refuses_a_new_env_on_a_full_disk_before_installing(tmp_path):
    out = _plan(tmp_path / "deep" / "env", min_free_gb="1000000000")
    assert out.returncode == 2 and "plan:" not in out.stdout
    assert "GB free on the disk holding" in out.stderr and str(tmp_path) in out.stderr
    assert "AVS_MIN_FREE_GB" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "deep").exists()
    assert "plan: create" in _plan(tmp_path / "deep" / "env", min_free_gb="0").stdout  # the documented way around
    bad = _plan(tmp_path / "env", min_free_gb="ten")
    assert bad.returncode == 2 and "AVS_MIN_FREE_GB='ten'" in bad.stderr


def test_setup_env_skips_the_space_check_when_reusing(tmp_path):
    _make_venv(tmp_path / "env")
    out = _plan(tmp_path / "env", min_free_gb="1000000000")
    assert out.returncode == 0 and "plan: reuse" in out.stdout


# Words that lead out of the repository: notes a reader of the repository does not have, issue numbers.
OUTSIDE_REFERENCE = re.compile(r"research/|\w+_spec(\.md|\s*§)|landscape\.md|\b[Ii]ssues?\s*#?\d+|\bsee #\d+")
TEXT_SUFFIXES = {".py", ".yaml", ".yml", ".md", ".sh", ".toml", ".txt", ".cfg", ".ini"}


def outside_references(root: Path, files: list[str]) -> list[str]:
    hits = []
    for name in files:
        path = root / name
        if path.suffix not in TEXT_SUFFIXES or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if OUTSIDE_REFERENCE.search(line):
                hits.append(f"{name}:{number}: {line.strip()[:100]}")
    return hits


def test_code_and_docs_point_only_inside_the_repository():
    root = _checkout_root()
    files = _git("ls-files", cwd=root).stdout.splitlines()
    files = [f for f in files if f != "tests/unit/test_repo_hygiene.py"]  # the pattern itself
    assert outside_references(root, files) == []


def test_outside_reference_check_catches_spec_pointers_and_issue_numbers(tmp_path):
    (tmp_path / "a.py").write_text("x = 1  # see research/ecmvae_spec.md §9\n# as asked in issue #12\nok = 'job #1'\n")
    (tmp_path / "b.yaml").write_text("lr: 1e-4   # ecmvae_spec §11.1\n")
    assert [h.split(":")[:2] for h in outside_references(tmp_path, ["a.py", "b.yaml"])] == [
        ["a.py", "1"],
        ["a.py", "2"],
        ["b.yaml", "1"],
    ]


def test_lint_and_format_are_clean():
    """ruff (configured in pyproject.toml) finds nothing to report and nothing to reformat."""
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).is_file():
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    root = _checkout_root()
    for args in (["check", "."], ["format", "--check", "."]):
        proc = subprocess.run([ruff, *args], cwd=root, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


# ----------------------------------------------------------------------------- function length
MAX_FUNCTION_LINES = 60  # def line to last line, decorators not counted, docstring and comments counted


def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """`path:line name (N lines)` for every function or method under `root` longer than `limit` lines."""
    hits = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in sorted(functions, key=lambda n: n.lineno):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                hits.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return hits


def test_no_function_in_avs_is_over_60_lines():
    """Split a longer function into named steps (each one idea), not into part1/part2."""
    assert long_functions(ROOT / "avs") == []


def test_function_length_check_counts_nested_functions_and_methods(tmp_path):
    body = "\n".join(f"        x{i} = {i}" for i in range(58))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(
        f"class A:\n    def fits(self):\n{body}\n        return 0\n\n"  # 60 lines: allowed
        f"    def over(self):\n{body}\n        y = 1\n        return y\n\n"  # 61 lines
        f"def outer():\n    def inner():\n{body.replace('        ', '            ')}\n"
        "            z = 2\n            return z\n    return inner\n"
    )
    assert long_functions(tmp_path) == [
        "pkg/m.py:63 over (61 lines)",
        "pkg/m.py:125 outer (63 lines)",
        "pkg/m.py:126 inner (61 lines)",
    ]


MAX_MODULE_LINES = 600


def test_no_module_in_avs_is_over_600_lines():
    """A module that grows past this holds more than one idea: split it by idea (docs/architecture.md)."""
    long = {
        str(p.relative_to(ROOT)): n
        for p in sorted((ROOT / "avs").rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}
