"""A .nemo (tar or extracted folder) is input from anywhere: reading it cannot reach outside it or
fill the disk (issue 18 item 3). Archives are written by the kit's own writer (save_nemo) and then
altered as a hostile or careless user would."""
import os
import tarfile

import pytest
import yaml
from omegaconf import OmegaConf

import data_prep
from data_prep.config import DataConfig, DataTokenizerConfig
from data_prep.nemo_archive import extract_tokenizer
from data_prep.tokenizers import train_sentencepiece
from modeling import build_model, presets, save_nemo
from modeling.config import ModelConfig
from modeling.nemo_io import MAX_CONFIG_ENV, MAX_MEMBER_ENV, NemoArchive, NemoArchiveError, write_nemo


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    texts = [f"User: question {i}\n\nAssistant: good {i} bad" for i in range(200)]
    return train_sentencepiece(iter(texts), 300, str(tmp_path_factory.mktemp("t") / "tokenizer.model"))


@pytest.fixture(scope="module")
def kit_nemo(tmp_path_factory, spm):
    """A real .nemo from the kit's writer: a tiny GPT with its sentencepiece tokenizer inside."""
    path = tmp_path_factory.mktemp("nemo") / "tiny.nemo"
    return str(save_nemo(build_model(presets.tiny_gpt(), vocab_size=100), str(path), tokenizer_path=spm))


def extracted(kit_nemo, where):
    """The archive extracted as the hands-on does (`tar -xvf`)."""
    with tarfile.open(kit_nemo) as t:
        t.extractall(where, filter="data")
    return where


def set_tokenizer_ref(folder, ref):
    path = folder / "model_config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["tokenizer"]["model"] = ref
    path.write_text(yaml.safe_dump(cfg))


def prep_cfg(stage_dir, restore):
    return OmegaConf.create({"data": OmegaConf.structured(DataConfig(tokenizer=DataTokenizerConfig(library="nemo"))),
                             "model": OmegaConf.structured(ModelConfig(restore_from_path=str(restore))),
                             "run": {"stage_dir": str(stage_dir)}})


@pytest.mark.parametrize("ref", ["nemo:../../secret/id_rsa", "nemo:{secret}", "nemo:sub/../../secret/id_rsa"])
def test_folder_reference_leaving_the_archive_is_refused(tmp_path, kit_nemo, ref):
    secret = tmp_path / "secret" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    secret.chmod(0o600)
    folder = extracted(kit_nemo, tmp_path / "models" / "gpt")
    set_tokenizer_ref(folder, ref.format(secret=secret))
    prep = tmp_path / "prep"
    with pytest.raises(NemoArchiveError, match=r"model_config\.yaml: tokenizer\.model = .*outside the archive"):
        data_prep.run(prep_cfg(prep, folder))
    assert not [n for n in os.listdir(prep) if "id_rsa" in n]  # nothing copied out


def test_folder_link_out_of_the_archive_is_refused(tmp_path, kit_nemo):
    secret = tmp_path / "id_rsa"
    secret.write_text("secret")
    folder = extracted(kit_nemo, tmp_path / "gpt")
    ref = yaml.safe_load((folder / "model_config.yaml").read_text())["tokenizer"]["model"]
    member = folder / ref[len("nemo:"):]
    member.unlink()
    member.symlink_to(secret)  # the name the config expects, a link to a file outside
    with pytest.raises(NemoArchiveError, match="a link to .*outside the extracted .nemo"):
        extract_tokenizer(str(folder), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_member_over_the_cap_writes_nothing_and_the_cap_can_be_raised(tmp_path, kit_nemo, spm, monkeypatch):
    size = os.path.getsize(spm)
    monkeypatch.setenv(MAX_MEMBER_ENV, str(size / 2 / (1 << 20)))  # half the tokenizer's size, in MiB
    out = tmp_path / "out"
    with pytest.raises(NemoArchiveError, match=rf"member '[0-9a-f]{{32}}_tokenizer\.model' .*tokenizer\.model.* "
                                               rf"is {size} bytes, over the {size // 2} bytes cap.*{MAX_MEMBER_ENV}"):
        extract_tokenizer(kit_nemo, str(out))
    assert os.listdir(out) == []  # no partial file, no .tmp
    monkeypatch.setenv(MAX_MEMBER_ENV, "1")
    path, library = extract_tokenizer(kit_nemo, str(out))
    assert library == "sentencepiece" and open(path, "rb").read() == open(spm, "rb").read()


def test_member_whose_header_claims_20_gib_is_refused_before_reading(tmp_path):
    """A 20 GiB member in a small archive (a sparse file, or a lying header): the default cap refuses
    it from the header alone, before a byte is written."""
    nemo = tmp_path / "big.nemo"
    write_nemo(str(nemo), {"tokenizer": {"library": "sentencepiece", "model": "nemo:big_tokenizer.model"}}, {})
    with tarfile.open(nemo, "a") as t:
        info = tarfile.TarInfo("./big_tokenizer.model")
        info.size = 20 << 30
        t.addfile(info)  # the header only: the archive stays a few KB
    assert os.path.getsize(nemo) < 1 << 20
    out = tmp_path / "out"
    with pytest.raises(NemoArchiveError, match=r"'big_tokenizer\.model'.* is 20480\.0 MiB, over the 256\.0 MiB cap"):
        extract_tokenizer(str(nemo), str(out))
    assert os.listdir(out) == []


def test_gzip_bomb_config_fails_at_once(tmp_path, kit_nemo):
    """model_config.yaml inflating to 256 MiB from a small gzip .nemo: refused from its size, not parsed
    (parsing it took 2 minutes of a core here)."""
    bomb = tmp_path / "bomb.nemo"
    body = 256 << 20

    class Spaces:
        def __init__(self):
            self.left = body

        def read(self, n=-1):
            n = self.left if n < 0 else min(n, self.left)
            self.left -= n
            return b"#" * n

    with tarfile.open(kit_nemo) as src, tarfile.open(bomb, "w:gz", compresslevel=1) as dst:
        for m in src.getmembers():
            if m.name == "./model_config.yaml":
                m.size = body
                dst.addfile(m, Spaces())
            else:
                dst.addfile(m, src.extractfile(m) if m.isfile() else None)
    assert os.path.getsize(bomb) < 4 << 20
    with NemoArchive(str(bomb)) as a, pytest.raises(NemoArchiveError, match=rf"bomb\.nemo/model_config\.yaml: "
                                                                         rf"256\.0 MiB, over the 4\.0 MiB cap.*{MAX_CONFIG_ENV}"):
        a.read_config()
    with pytest.raises(NemoArchiveError, match="over the 4.0 MiB cap"):
        data_prep.run(prep_cfg(tmp_path / "prep", bomb))


def test_cut_or_malformed_archive_is_named(tmp_path, kit_nemo):
    cut = tmp_path / "cut.nemo"
    data = open(kit_nemo, "rb").read()
    cut.write_bytes(data[: len(data) // 2])
    with NemoArchive(str(cut)) as a, pytest.raises(NemoArchiveError, match="cut.nemo: .*truncated or corrupt"):
        a.names()
    folder = extracted(kit_nemo, tmp_path / "f")
    (folder / "model_config.yaml").write_text("- a list\n- not a mapping\n")
    with pytest.raises(NemoArchiveError, match=r"f/model_config\.yaml: expected a mapping"):
        NemoArchive(str(folder)).read_config()
