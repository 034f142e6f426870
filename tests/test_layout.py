"""The package's shape (docs/layout.md): subpackages in layers, each importing only layers below it.

A stage's logic lives in one folder, built on the shared layers (core, models, prompts,
datasets); stage folders do not import one another, so a change to one stage's folder cannot
reach into another's, and there is no import cycle between folders. Imports are read with `ast`
(function-level ones included), nothing is imported.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "imagenet_sd"
# Lower numbers are lower layers; a folder may import folders of a strictly lower layer only.
LAYERS = {
    "core": 0,
    "models": 1,
    "prompts": 2,
    "datasets": 3,
    "language": 4, "digits": 4, "generate": 4, "filter": 4, "train": 4, "evaluate": 4, "experiments": 4,
    "clip_tune": 5, "report": 5,
}


def folder_imports() -> dict[tuple[str, str], str]:
    """(importing folder, imported folder) -> one file:line where it happens, across folders."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) == 1:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                dotted = name.split(".")
                if dotted[0] == "imagenet_sd" and len(dotted) > 1 and dotted[1] != parts[0]:
                    found.setdefault((parts[0], dotted[1]), f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return found


def test_every_subpackage_has_a_layer_and_few_modules_sit_at_the_top():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == set(LAYERS), f"add the new folder to LAYERS here and to docs/layout.md: {folders ^ set(LAYERS)}"
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 3, f"modules directly under src/imagenet_sd/ belong in a subpackage: {top}"


def test_folders_import_only_lower_layers_relatively_or_not():
    relative = [f"{p.relative_to(PACKAGE.parent)}:{n.lineno}" for p in PACKAGE.rglob("*.py")
                for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ImportFrom) and n.level]
    assert not relative, f"import by absolute name (from imagenet_sd.<folder>.<module> import ...): {relative}"
    upward = [f"{where}: {a} (layer {LAYERS[a]}) imports {b} (layer {LAYERS[b]})"
              for (a, b), where in folder_imports().items() if LAYERS[b] >= LAYERS[a]]
    assert not upward, "a folder imports one of its own layer or above; move the shared code down:\n" + "\n".join(upward)


def test_the_layout_page_names_every_module_under_its_folder():
    """docs/layout.md is where a newcomer finds the room for a change: each module is listed there."""
    text = (PACKAGE.parents[1] / "docs" / "layout.md").read_text()
    missing = []
    for folder in sorted(LAYERS):
        start = text.index(f"### `{folder}/`")
        section = text[start:text.find("\n### ", start + 1)]
        missing += [f"{folder}/{p.name}" for p in sorted((PACKAGE / folder).glob("*.py"))
                    if p.name != "__init__.py" and f"- `{p.name}`" not in section]
    assert not missing, f"list these in docs/layout.md under their folder: {missing}"
