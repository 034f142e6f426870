"""The head registry (models/heads/): every registered head is documented and tested, and each
head's own behaviour. Training a head end to end: tests/test_training.py (t-ReX) and below."""
import ast
import re
from pathlib import Path

import torch
import torchvision
from torch import nn

from imagenet_sd.models import heads, network
from imagenet_sd.models.heads.linear import Linear

ROOT = Path(__file__).resolve().parents[1]


def slug(heading: str) -> str:
    """MkDocs' anchor of a heading (its default toc slugify)."""
    text = re.sub(r"[^\w\s-]", "", heading).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def test_every_registered_head_has_its_docs_section_and_its_tests():
    """A head module says `Docs: docs/<page>.md#<anchor>` in its docstring, that section exists, and
    a test named test_<name>_head_... is in tests/ (docs/layout.md#a-training-head)."""
    tests = {node.name for path in ROOT.glob("tests/test_*.py")
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)}
    problems = []
    for name, head in heads.HEADS.items():
        module = __import__(head.__module__, fromlist=["_"])
        found = re.search(r"^Docs: docs/([\w/-]+\.md)#([\w-]+)$", module.__doc__ or "", re.MULTILINE)
        if found is None:
            problems.append(f"{head.__module__}: its docstring has no line 'Docs: docs/<page>.md#<anchor>'")
        else:
            page, anchor = ROOT / "docs" / found[1], found[2]
            anchors = {slug(m) for m in re.findall(r"^#+ (.+)$", page.read_text(), re.MULTILINE)} if page.is_file() else set()
            if anchor not in anchors:
                problems.append(f"{head.__module__}: docs/{found[1]} has no section #{anchor}")
        if not any(t.startswith(f"test_{name}_head") for t in tests):
            problems.append(f"head {name!r}: no test_{name}_head_... in tests/")
    assert not problems, "\n".join(problems)


def test_linear_head_is_torchvisions_fc_so_its_checkpoint_is_a_plain_resnet50():
    net = network.build("resnet50", Linear(), 5)
    plain = torchvision.models.resnet50(num_classes=5)
    assert type(net.fc) is nn.Linear and net.fc.out_features == 5
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    plain.load_state_dict(net.state_dict())
    image = torch.rand(1, 3, 32, 32)
    assert torch.equal(plain.eval()(image), net.eval()(image))


def test_cosine_head_trains_and_evaluates_from_its_checkpoint(tmp_path):
    """A tiny run with `head: cosine`: its scale learns, and the checkpoint loads for evaluation (the
    same logits) and for transfer (the pooled 2048-d feature)."""
    from imagenet_sd.evaluate import checkpoints, transfer
    from imagenet_sd.models.heads.cosine import SCALE, CosineClassifier
    from imagenet_sd.prompts import prompts
    from imagenet_sd.train import loop, training
    from test_training import KEYS, tiny_params, write_colour_shards
    write_colour_shards(tmp_path / "shards", per_class=4)
    p = tiny_params(tmp_path, epochs=1, local_crops=0, head="cosine")
    dataset, _ = training.open_training_set(p, KEYS, tmp_path / "shards")
    result = loop.train(dataset, len(KEYS), p.train, 0, torch.device("cpu"))
    head = result.model.fc
    assert isinstance(head, CosineClassifier) and float(head.scale) != SCALE
    out = tmp_path / "resnet50.pt"
    training.save_checkpoint(out, result.model, [prompts.ClassPrompt(wnid=k, index=i, c=k, h_c="", d_c="", prompt=k)
                                                 for i, k in enumerate(KEYS)], p.train, {})
    loaded = checkpoints.load_checkpoint(out)
    image = torch.rand(2, 3, 32, 32)
    assert torch.allclose(loaded.model(image), result.model.eval()(image), atol=1e-5)
    assert transfer.encoder_of(loaded.model)(image).shape == (2, 2048)
    assert torch.load(out, weights_only=True)["head"] == "cosine"
