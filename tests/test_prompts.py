"""Class sets and WordNet prompts (the paper's Table 1 variants)."""
import pytest

from imagenet_sd.core.errors import UserError
from imagenet_sd.prompts import classes, prompts


def by_wnid(rows):
    return {r.wnid: r for r in rows}


@pytest.fixture(scope="module")
def in1k_prompts():
    return by_wnid(prompts.build(classes.load_class_set("imagenet1k"), "c_hc"))


def test_papillon_has_the_papers_hypernym_and_definition(in1k_prompts):
    papillon = in1k_prompts["n02086910"]
    assert papillon.c == "papillon"
    assert papillon.h_c == "toy spaniel"
    assert papillon.d_c == "small slender toy spaniel with erect ears and a black-spotted brown to white coat"


def test_pirate_ship_lemmas_hypernym_and_definition(in1k_prompts):
    pirate = in1k_prompts["n03947888"]
    assert pirate.c == "pirate, pirate ship"
    assert pirate.h_c == "ship"
    assert pirate.d_c == "a ship that is manned by pirates"


def test_several_hypernyms_are_comma_separated(in1k_prompts):
    assert in1k_prompts["n02672831"].h_c == "free-reed instrument, keyboard instrument"


@pytest.mark.parametrize("variant, expected", [
    ("c", "papillon"),
    ("c_hc", "papillon, toy spaniel"),
    ("c_dc", "papillon, small slender toy spaniel with erect ears and a black-spotted brown to white coat"),
    ("c_hc_b", "papillon, toy spaniel inside indoor church"),
])
def test_variants_render_as_in_the_paper(variant, expected):
    spec = classes.ClassSpec(index=0, wnid="n02086910")
    row = prompts.class_prompt(spec, variant)
    assert row.text("indoor church") == expected


def test_background_prompt_needs_a_background():
    row = prompts.class_prompt(classes.ClassSpec(index=0, wnid="n02086910"), "c_hc_b")
    with pytest.raises(ValueError):
        row.text()


def test_class_sets_have_unique_ids_and_in100_is_inside_in1k():
    in100 = [c.wnid for c in classes.load_class_set("imagenet100")]
    in1k = [c.wnid for c in classes.load_class_set("imagenet1k")]
    assert len(in100) == len(set(in100)) == 100
    assert len(in1k) == len(set(in1k)) == 1000
    assert set(in100) <= set(in1k)
    assert in1k == sorted(in1k)                      # standard class-index order
    assert in1k[0] == "n01440764" and in1k[999] == "n15075141"
    assert [c.index for c in classes.load_class_set("imagenet100")] == list(range(100))


def test_custom_file_with_wnids_and_free_form_classes(tmp_path):
    path = tmp_path / "mine.tsv"
    path.write_text("# my classes\nn02086910\n\nsolar panel\tphotovoltaic cells on a frame\tdevice\n"
                    "kombucha\tfermented sweet tea\n")
    specs = classes.read_custom(path)
    assert [s.key for s in specs] == ["n02086910", "solar panel", "kombucha"]
    rows = prompts.build(specs, "c_dc")
    assert rows[1].prompt == "solar panel, photovoltaic cells on a frame"
    assert prompts.build(specs[:2], "c_hc")[1].prompt == "solar panel, device"
    with pytest.raises(UserError, match="kombucha.*no hypernym"):
        prompts.build(specs, "c_hc")


@pytest.mark.parametrize("content, message", [
    ("n0208691\n", "expected a WordNet id"),
    ("n02086910\nn02086910\n", "listed twice"),
    ("# only a comment\n", "no classes"),
])
def test_custom_file_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        classes.read_custom(path)


def test_unknown_wnid_is_a_user_error():
    with pytest.raises(UserError, match="n99999999"):
        prompts.build([classes.ClassSpec(index=0, wnid="n99999999")], "c")


def test_prompt_table_round_trips(tmp_path):
    rows = prompts.build(classes.load_class_set("imagenet100"), "c_hc_b")
    path = tmp_path / "prompts.tsv"
    prompts.write(path, rows)
    assert prompts.read(path) == rows
    header = path.read_text().splitlines()[0]
    assert header == "wnid\tindex\tc\th_c\td_c\tprompt"
