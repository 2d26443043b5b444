"""The Spacefile is valid Spacefile v0 and would run the app on a Python that pyproject allows."""

import re
from pathlib import Path

import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
# Spacefile v0's engines; `custom` runs the micro's own commands
ENGINES = {
    "static",
    "react",
    "svelte",
    "vue",
    "next",
    "nuxt",
    "sveltekit",
    "python3.9",
    "python3.8",
    "nodejs16",
    "custom",
}


def test_the_spacefile_runs_app_py_on_a_python_that_pyproject_allows():
    spacefile = yaml.safe_load((ROOT / "Spacefile").read_text())
    assert spacefile["v"] == 0
    (micro,) = spacefile["micros"]
    assert micro["engine"] in ENGINES and micro["primary"] is True
    assert set(micro) <= {
        "name",
        "src",
        "engine",
        "primary",
        "commands",
        "include",
        "run",
        "dev",
        "public_routes",
        "presets",
    }
    assert re.match(r"^\S*python\S* app\.py\b", micro["run"])
    assert {"app.py", "mrg", "assets"} <= set(micro["include"])
    requires = re.search(
        r'^requires-python = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE
    ).group(1)
    if micro["engine"].startswith("python"):
        version = micro["engine"].removeprefix("python")
    else:
        (version,) = re.findall(r"--python (\d+\.\d+)", " ".join(micro["commands"]))
    assert version in SpecifierSet(requires), f"Python {version} does not satisfy {requires}"
    names = {e["name"] for e in micro["presets"]["env"]}
    assert {"MRG_DATA_DIR", "MRG_CHECKPOINTS"} <= names
