"""The command line starts without torch, zarr or dask: `--help`, `--version` and the registry's
listing import none of them; a command loads them when it runs."""

import subprocess
import sys
from importlib.metadata import version

HEAVY = ("torch", "zarr", "dask", "scipy", "timm", "sklearn")


def imported_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_help_of_every_command_and_the_registry_listing_import_no_heavy_package():
    code = """
from typer.testing import CliRunner
from stegoscope.cli import app
from stegoscope import methods
for args in (["--help"], ["study", "--help"], ["train", "--help"], ["reduce", "--help"], ["status", "--help"]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and "Usage" in result.output, result.output
assert "stego" in methods.describe(methods.HEAD) and methods.get("pca").title == "PCA"
"""
    assert imported_after(code) == []


def test_a_method_s_classes_are_imported_when_used_and_version_prints_the_installed_one():
    from typer.testing import CliRunner

    from stegoscope import methods
    from stegoscope.cli import app
    from stegoscope.heads.stego import StegoParams, StegoTrainer

    assert methods.get("stego").cls is StegoTrainer and methods.get("stego").params is StegoParams
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"stegoscope {version('stegoscope')}"
