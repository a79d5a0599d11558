"""fdl's BERT equals a randomly initialised HuggingFace BERT (weights imported), both ways."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fdl.interop.hf_bert import config_from_hf, from_hf_bert, to_hf_bert  # noqa: E402
from fdl.interop.state_dict import StateDictError  # noqa: E402
from fdl.models.sequence.bert import bert_encoder, bert_pretraining  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    c = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=24, type_vocab_size=2)
    m = transformers.BertForPreTraining(c).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values
        for name, p in m.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return c, m


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 97, size=(3, 10))
    segments = (np.arange(10)[None, :] >= 5).astype(np.int64).repeat(3, 0)
    valid = np.array([10, 7, 4])
    positions = np.array([[1, 2, 8], [0, 3, 6], [1, 2, 3]])
    return tokens, segments, valid, positions


def test_outputs_equal_huggingface_in_eval_mode(hf_model):
    c, m = hf_model
    cfg = config_from_hf(c)
    params = from_hf_bert(m.state_dict(), cfg)
    tokens, segments, valid, positions = _batch()
    mask = (np.arange(10)[None, :] < valid[:, None]).astype(np.int64)
    with torch.no_grad():
        hf = m(input_ids=torch.from_numpy(tokens), token_type_ids=torch.from_numpy(segments),
               attention_mask=torch.from_numpy(mask), output_hidden_states=True)
        seq = m.bert(input_ids=torch.from_numpy(tokens),
                     token_type_ids=torch.from_numpy(segments),
                     attention_mask=torch.from_numpy(mask))
    model = bert_pretraining(cfg)
    out, _ = jax.jit(model.apply)(params, {}, (jnp.asarray(tokens, jnp.int32),
                                               jnp.asarray(segments, jnp.int32),
                                               jnp.asarray(valid, jnp.int32),
                                               jnp.asarray(positions, jnp.int32)))
    keep = mask.astype(bool)  # padded positions are not compared (HF still computes them)
    np.testing.assert_allclose(np.asarray(out.encoded)[keep],
                               seq.last_hidden_state.numpy()[keep], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out.pooled, seq.pooler_output.numpy(), atol=1e-4, rtol=1e-4)
    mlm_ref = np.take_along_axis(hf.prediction_logits.numpy(), positions[..., None], 1)
    np.testing.assert_allclose(out.mlm_logits, mlm_ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out.nsp_logits, hf.seq_relationship_logits.numpy(), atol=1e-4,
                               rtol=1e-4)
    # BertModel's own state dict (no "bert." prefix, no heads) -> the encoder alone
    enc_params = from_hf_bert(m.bert.state_dict(), cfg)
    (h, pooled), _ = bert_encoder(cfg).apply(enc_params, {}, (tokens, segments, valid))
    np.testing.assert_allclose(pooled, seq.pooler_output.numpy(), atol=1e-4, rtol=1e-4)


def test_export_round_trips_and_loads_into_huggingface(hf_model, tmp_path):
    c, m = hf_model
    cfg = config_from_hf(c)
    sd = {k: v.numpy() for k, v in m.state_dict().items()}
    params = from_hf_bert(sd, cfg)
    back = to_hf_bert(params, cfg)
    for k, v in back.items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)
    # the exported dict loads into a fresh HF model (strict) and via a safetensors file
    fresh = transformers.BertForPreTraining(c).eval()
    result = fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()},
                                   strict=False)
    assert not result.unexpected_keys and all("position_ids" in k for k in result.missing_keys)
    from fdl.interop.state_dict import save_safetensors

    path = tmp_path / "bert.safetensors"
    save_safetensors(path, back)
    again = from_hf_bert(path, cfg)
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_mismatched_config_and_state_dict_name_the_keys(hf_model):
    c, m = hf_model
    cfg = config_from_hf(c, num_hiddens=48, num_heads=4)
    with pytest.raises(StateDictError) as e:
        from_hf_bert(m.state_dict(), cfg)
    msg = str(e.value)
    assert "bert.embeddings.word_embeddings.weight: expected (97, 48), got (97, 32)" in msg
    with pytest.raises(StateDictError, match="missing keys.*layer.2"):
        from_hf_bert(m.state_dict(), config_from_hf(c, num_layers=3))
    with pytest.raises(ValueError, match="divisible"):
        config_from_hf(c, num_heads=5)
    with pytest.raises(ValueError, match="position_embedding_type"):
        config_from_hf({**c.to_dict(), "position_embedding_type": "relative_key"})


def test_finetuning_heads_equal_huggingface():
    """bert_classifier / bert_tagger / bert_qa on weights of HF's fine-tuning models: the
    same logits in eval mode; export back names the head as HF does."""
    from fdl.models.sequence.bert import bert_classifier, bert_qa, bert_tagger

    torch.manual_seed(1)
    c = transformers.BertConfig(vocab_size=97, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32,
                                max_position_embeddings=12, num_labels=3)
    cfg = config_from_hf(c)
    tokens, segments, valid, _ = _batch()
    mask = (np.arange(10)[None, :] < valid[:, None]).astype(np.int64)
    args = dict(input_ids=torch.from_numpy(tokens), token_type_ids=torch.from_numpy(segments),
                attention_mask=torch.from_numpy(mask))
    x = {"tokens": tokens.astype(np.int32), "segments": segments.astype(np.int32),
         "valid_lens": valid.astype(np.int32)}
    keep = mask.astype(bool)
    for hf_cls, layer, head in (
            (transformers.BertForSequenceClassification, bert_classifier(cfg, 3), "classifier"),
            (transformers.BertForTokenClassification, bert_tagger(cfg, 3), "tagger"),
            (transformers.BertForQuestionAnswering, bert_qa(cfg), "qa")):
        m = hf_cls(transformers.BertConfig(**{**c.to_dict(), "num_labels": 2}) if head == "qa"
                   else c).eval()
        sd = {k: v.numpy() for k, v in m.state_dict().items()}
        params = from_hf_bert(sd, cfg)
        assert set(params) == {"bert", "head"}
        out, _ = layer.apply(params, {}, x)
        with torch.no_grad():
            ref = m(**args)
        if head == "qa":
            for got, want in zip(out, (ref.start_logits, ref.end_logits)):
                np.testing.assert_allclose(np.asarray(got)[keep], want.numpy()[keep],
                                           atol=1e-4, rtol=1e-4)
        elif head == "tagger":
            np.testing.assert_allclose(np.asarray(out)[keep], ref.logits.numpy()[keep],
                                       atol=1e-4, rtol=1e-4)
        else:
            np.testing.assert_allclose(out, ref.logits.numpy(), atol=1e-4, rtol=1e-4)
        back = to_hf_bert(params, cfg, head=head)
        assert sorted(back) == sorted(k for k in sd if "position_ids" not in k)
        for k, v in back.items():
            np.testing.assert_array_equal(v, sd[k], err_msg=k)
