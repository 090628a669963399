"""Every Python source of the project compiles with warnings as errors: an invalid escape
such as ``"\\("`` in a non-raw string is a SyntaxWarning today and a SyntaxError in a later
Python, and pytest's assertion rewriting hides the warning from a normal test run."""
import pathlib
import warnings

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_source_compiles_without_a_syntax_warning():
    bad = []
    for folder in ("lrwatch", "tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if ".cache" in path.parts:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                try:
                    compile(path.read_text(encoding="utf-8"), str(path), "exec")
                except SyntaxError as e:
                    bad.append(f"{path.relative_to(ROOT)}:{e.lineno}: {e.msg}")
    assert not bad, "fix these (a raw string r'...' for a regex):\n" + "\n".join(bad)
