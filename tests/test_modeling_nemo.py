"""NeMo's own restore path reads the `.nemo` files we write.

Needs nemo_toolkit (`pip install 'nemo_toolkit[core]==3.0.0'`, CPU is fine); skipped without it.
3.0.0 has no GPT class, but it still carries `ModelPT` and `SaveRestoreConnector`, which unpack
the archive, load model_config.yaml, resolve `nemo:` artifacts through `register_artifact`, and
load model_weights.ckpt into the model with strict key matching. A minimal ModelPT that holds our
GPTModel under `self.model` has exactly the `model.`-prefixed keys of the checkpoint.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("nemo.core", reason="pip install 'nemo_toolkit[core]==3.0.0'")
from nemo.core import ModelPT  # noqa: E402
from nemo.core.connectors.save_restore_connector import SaveRestoreConnector  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from modeling import GPTModel, RewardModel, build_model, config_from_nemo, load_pretrained, presets, save_nemo  # noqa: E402


class KitGPT(ModelPT):
    """The smallest NeMo model that restores our checkpoints: config -> our module under `model`."""

    def __init__(self, cfg, trainer=None):
        super().__init__(cfg=cfg, trainer=trainer)
        tok = self.register_artifact("tokenizer.model", cfg.tokenizer.model)  # resolves nemo:<name>
        with open(tok, "rb") as f:
            self.tokenizer_bytes = f.read()  # the unpack dir is deleted once restore_from returns
        mc = config_from_nemo(OmegaConf.to_container(cfg, resolve=True))
        cls = RewardModel if "output_sequence" in cfg else GPTModel
        self.model = cls(mc, cfg.vocab_size, with_lm_head=cls is GPTModel)

    def setup_training_data(self, train_data_config):
        pass

    def setup_validation_data(self, val_data_config):
        pass

    @classmethod
    def list_available_models(cls):
        return []


@pytest.mark.parametrize("head", [None, "reward"])
def test_nemo_restore_from_reads_our_archive(tmp_path, head):
    torch.manual_seed(0)
    ours = build_model(presets.tiny_gpt(), vocab_size=100).eval()
    tok = tmp_path / "tokenizer.model"
    tok.write_bytes(os.urandom(257))
    path = save_nemo(ours, tmp_path / "sft.nemo", tokenizer_path=str(tok))
    if head:
        ours = load_pretrained(path, head=head).eval()
        path = save_nemo(ours, tmp_path / "rm.nemo", tokenizer_path=str(tok))

    # NeMo's tar reader unpacks it and finds its three members
    names = [m.name for m in SaveRestoreConnector._filtered_tar_info(str(path))]
    assert "./model_config.yaml" in names and "./model_weights.ckpt" in names
    conf = SaveRestoreConnector.restore_from(SaveRestoreConnector(), KitGPT, str(path), return_config=True)
    assert conf.tokenizer.model.startswith("nemo:") and conf.num_layers == 2

    # full restore: config -> instance, nemo: artifact resolved, weights loaded strictly
    nemo_model = KitGPT.restore_from(str(path), map_location=torch.device("cpu"), strict=True).eval()
    assert nemo_model.tokenizer_bytes == tok.read_bytes()
    for (k, v), (k2, v2) in zip(ours.state_dict().items(), nemo_model.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    x = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        assert torch.equal(nemo_model.model(x), ours(x))
