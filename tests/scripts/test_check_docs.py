"""scripts/check_docs.py: passes on the repository, and fails, naming them, on a path and a flag
that do not exist."""
import os
import subprocess
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
CHECK = os.path.join(ROOT, "scripts", "check_docs.py")


def test_the_repository_docs_name_only_what_exists():
    out = subprocess.run([sys.executable, CHECK], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_missing_path_and_an_unknown_flag_fail(tmp_path):
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "real.cc").write_text('ABSL_FLAG(int, real_flag, 0, "");\n')
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("See `core/real.cc` and `core/gone.cc`, [spec](docs/nothere.md).\n\n"
                                        "```sh\nserver --real_flag=1 --no_such_flag=2\n```\n")
    out = subprocess.run([sys.executable, CHECK, "--root", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "core/gone.cc" in out.stdout and "docs/nothere.md" in out.stdout and "--no_such_flag" in out.stdout
    assert "core/real.cc" not in out.stdout and "--real_flag" not in out.stdout
