"""Display names for class folders, and Japanese names rendering without tofu boxes."""
import warnings

import numpy as np

from train import read_display_names


def test_tsv_maps_folders_to_the_last_column_and_keeps_unlisted_folders(tmp_path):
    tsv = tmp_path / "names.tsv"
    tsv.write_text("folder\tname_en\tname_ja\nina\tNinomae Ina'nis\t一伊那尓栖\ngura\tGawr Gura\tがうる・ぐら\n",
                   encoding="utf-8")
    assert read_display_names(tsv, ["gura", "ina", "new"]) == ["がうる・ぐら", "一伊那尓栖", "new"]


def test_shared_names_file_covers_the_character_set():
    from conftest import shared_file

    tsv = shared_file("datasets/characters-names.tsv")
    folders = [line.split("\t")[0] for line in tsv.read_text(encoding="utf-8").splitlines()[1:]]
    names = read_display_names(tsv, folders)
    assert len(names) == 20 and "ワトソン・アメリア" in names


def test_japanese_labels_render_with_real_glyphs(tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    from plots import confusion_matrix_figure  # sets up the Japanese font

    family = plt.rcParams["font.family"][0]
    font = FT2Font(font_manager.findfont(family, fallback_to_default=False))
    for ch in "高坂穂乃果ワトソン・アメリアがうる・ぐら":
        assert font.get_char_index(ord(ch)) != 0, f"{family} has no glyph for {ch!r}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns "Glyph ... missing from font(s)" for tofu
        confusion_matrix_figure(np.eye(2, dtype=int) * 3, ["高坂穂乃果", "南ことり"], tmp_path / "cm.png", title="混同行列")
    assert (tmp_path / "cm.png").stat().st_size > 1000


def test_a_names_file_naming_no_class_folder_is_an_error_and_a_partial_one_says_which_are_unlisted(tmp_path, capsys):
    import pytest

    commas = tmp_path / "names.csv"
    commas.write_text("folder,name\ngura,Gawr Gura\nina,Ina\n", encoding="utf-8")  # commas, not tabs
    with pytest.raises(ValueError, match="no tab-separated rows.*folder<TAB>display name"):
        read_display_names(commas, ["gura", "ina"])
    other = tmp_path / "other.tsv"
    other.write_text("honoka\t高坂穂乃果\n", encoding="utf-8")  # another character set
    with pytest.raises(ValueError, match="names none of the class folders \\(gura, ina\\)"):
        read_display_names(other, ["gura", "ina"])
    partial = tmp_path / "partial.tsv"
    partial.write_text("gura\tGawr Gura\n", encoding="utf-8")
    assert read_display_names(partial, ["gura", "ina", "new"]) == ["Gawr Gura", "ina", "new"]
    assert "has no row for ina, new; shown by folder name" in capsys.readouterr().err
