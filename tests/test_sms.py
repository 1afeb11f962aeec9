"""The SMS spam task's data: the collection and its split, the MiniLM tokenizer and weights, and
the torch twin's pooled embedding on real messages (skipped without the ``text`` extra)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from symgrad.tasks import sms

try:
    sms.minilm_files()
    sms.read_sms()
except sms.MissingDataError as exc:  # pragma: no cover - the extra is not installed
    pytest.skip(str(exc), allow_module_level=True)


def test_collection_counts():
    texts, labels = sms.read_sms()
    assert len(texts) == labels.size == 4862
    assert int(labels.sum()) == 642
    assert labels.dtype == np.int64
    # CSV-quoted lines are unquoted, doubled quotes undone
    assert any(t.startswith('Superb Thought- "Be grateful') for t in texts)
    assert not any(t.startswith('"') and t.endswith('"') and '""' in t for t in texts)


def test_split_is_stratified_and_deterministic():
    a = sms.load_sms(seed=0)
    b = sms.load_sms(seed=0)
    c = sms.load_sms(seed=1)
    assert (len(a.train_texts), len(a.test_texts)) == (3403, 1459)
    assert (int(a.train_labels.sum()), int(a.test_labels.sum())) == (449, 193)
    assert a.train_texts == b.train_texts and a.test_texts == b.test_texts
    assert np.array_equal(a.test_labels, b.test_labels)
    assert a.test_texts != c.test_texts
    train, test = sms.stratified_split(sms.read_sms()[1], 0.3, seed=0)
    assert np.intersect1d(train, test).size == 0 and train.size + test.size == 4862


def test_tokenize_pads_to_longest_and_truncates():
    ids, mask = sms.tokenize(["Ok lar...", "Free entry in 2 a wkly comp to win FA Cup final tkts"])
    assert ids.dtype == mask.dtype == np.int64
    assert ids.shape == mask.shape and ids.shape[1] == mask.sum(1).max() < 128
    assert ids[0, 0] == 101 and ids[0, mask[0].sum() - 1] == 102  # [CLS] ... [SEP]
    assert (ids[mask == 0] == 0).all() and mask[0, -1] == 0 and mask[1].all()
    ids, mask = sms.tokenize(["word " * 300], max_length=16)
    assert ids.shape == (1, 16) and ids[0, -1] == 102


def test_weights_match_config():
    config = sms.load_minilm_config()
    w = sms.load_minilm_weights(np.float64)
    n, f, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    assert w["embeddings.word_embeddings.weight"].shape == (config["vocab_size"], n)
    assert w["embeddings.position_embeddings.weight"].shape == (
        config["max_position_embeddings"],
        n,
    )
    assert w["embeddings.token_type_embeddings.weight"].shape == (config["type_vocab_size"], n)
    for i in range(L):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            assert w[f"{p}attention.self.{name}.weight"].shape == (n, n)
        assert w[f"{p}intermediate.dense.weight"].shape == (f, n)
        assert w[f"{p}output.dense.weight"].shape == (n, f)
    assert len(w) == 5 + 1 + 16 * L + 2  # embeddings + position_ids + layers + pooler
    assert w["encoder.layer.0.output.dense.weight"].dtype == np.float64
    assert w["embeddings.position_ids"].dtype == np.int64


def test_twin_pooled_output():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from symgrad.torch.bert import minilm_twin

    texts = sms.read_sms()[0][:3]
    model = minilm_twin(torch.float32)
    ids, mask = sms.tokenize(texts)
    with torch.no_grad():
        e = model.pooled(torch.from_numpy(ids), torch.from_numpy(mask))
        logits = model(torch.from_numpy(ids), torch.from_numpy(mask))
    assert e.shape == (3, 384) and e.dtype == torch.float32 and torch.isfinite(e).all()
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()
