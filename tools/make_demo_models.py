"""Make the demo model files in ``weights/``: small, real models the service's text, embedding
and image paths can be tested and demonstrated with, built from data the repository holds.

    python -m tools.make_demo_models          # from the repository root; about 25 s of CPU

It writes:

- ``text_demo_tokenizer.json``: a lowercasing BERT-style WordPiece tokenizer (``tokenizers``;
  vocab 2000, ``[PAD]`` = 0, ``[CLS] text [SEP]``, no padding or truncation) whose vocabulary
  is learnt from ``README.md`` and ``docs/*.md``.
- ``text_demo_config.json``: the ``transformers.BertConfig`` of both text models (2 layers,
  hidden size 64, 4 heads, 128 positions; it also names the classifier's labels).
- ``text_cls_demo.pt2``: a ``BertForSequenceClassification`` trained from scratch to tell
  which docs file a sentence comes from (``TEXT_LABELS``), exported with ``torch.export``:
  ``forward(input_ids, attention_mask) -> logits (batch, len(TEXT_LABELS))``.
- ``text_embed_demo.pt2``: that classifier's encoder, exported the same way:
  ``forward(input_ids, attention_mask) -> last_hidden_state (batch, seq, 64)``.
- ``digits_cnn.safetensors``: the weights of ``bales_stream.architectures.DigitsCNN`` trained
  on scikit-learn's 8x8 digits, fed as uint8 pixels 0..255.

Both ``.pt2`` programs take int64 ``(batch, seq)`` inputs with a dynamic batch (>= 1) and a
dynamic sequence length (1..128). The attention is the eager implementation (an explicit
additive mask), so right-padding with ``[PAD]`` and mask 0 leaves the real positions' outputs
unchanged; the script checks this, and that the exported programs match the eager modules.

Seeds are fixed and torch runs on one thread; the tokenizer trainer alone may differ between
runs in a few tokens (see ``train_tokenizer``), and the docs it learns from change, so a rerun
makes equivalent files, not the same bytes: the committed ones are the reference. Tests import
``eager_text_model``, ``eager_digits_cnn``, ``digits_uint8`` and ``TEXT_LABELS``; importing
this module trains and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.export import Dim

from bales_stream.architectures import DigitsCNN

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS_DIR = ROOT / "weights"
TOKENIZER_FILE = "text_demo_tokenizer.json"
CONFIG_FILE = "text_demo_config.json"
EMBED_FILE = "text_embed_demo.pt2"
CLS_FILE = "text_cls_demo.pt2"
DIGITS_FILE = "digits_cnn.safetensors"
TEXT_MODEL_FILES = {"text_embed_demo": EMBED_FILE, "text_cls_demo": CLS_FILE}

SEED = 0
VOCAB_SIZE = 2000
MAX_LENGTH = 128
HIDDEN_SIZE = 64
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD_ID = 0

TEXT_LABELS = ["cluster", "operations", "security", "wire-format"]
"""The classifier's labels, in class-index order: the docs file (``docs/<label>.md``) a
sentence comes from."""
TEXT_HELD_OUT_FRACTION = 0.2
TEXT_EPOCHS = 30
TEXT_LEARNING_RATE = 5e-4
TEXT_BATCH_SIZE = 16
MIN_SENTENCE_WORDS = 4

DIGITS_HELD_OUT_FRACTION = 0.25
DIGITS_EPOCHS = 40

CHECK_BATCHES = (1, 2, 7, 64)
CHECK_SEQS = (1, 2, 3, 17, 128)
TOLERANCE = 1e-5


# ---- text: corpus, tokenizer, config ----------------------------------------------------


def corpus_files() -> list[Path]:
    """The repository text the tokenizer learns from: README.md, then docs/*.md sorted."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def train_tokenizer():  # -> tokenizers.Tokenizer
    """A lowercasing BERT-style WordPiece tokenizer (``[CLS] text [SEP]``, no padding or
    truncation) trained by the ``tokenizers`` WordPiece trainer on ``corpus_files()``.

    The trainer breaks count ties in hash-map order, seeded per process: a rerun may learn a
    vocabulary that differs in a few tokens (and so retrain models that differ). The
    committed files are the reference the tests check."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = WordPieceTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS)
    tokenizer.train([str(path) for path in corpus_files()], trainer)
    ids = tokenizer.get_vocab()
    assert ids["[PAD]"] == PAD_ID, ids["[PAD]"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    return tokenizer


def bert_config(vocab_size: int):  # -> transformers.BertConfig
    """The configuration both text models share (the classifier's labels included), with
    eager attention: an explicit additive mask, the same in the exported graph as in eager."""
    from transformers import BertConfig

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=MAX_LENGTH,
        type_vocab_size=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=PAD_ID,
        id2label=dict(enumerate(TEXT_LABELS)),
        label2id={label: i for i, label in enumerate(TEXT_LABELS)},
    )
    config._attn_implementation = "eager"
    return config


def load_bert_config(path: Path):  # -> transformers.BertConfig
    """The saved config, with the eager attention the exported programs were traced with
    (the attention implementation is not part of the JSON)."""
    from transformers import BertConfig

    config = BertConfig.from_dict(json.loads(path.read_text()))
    config._attn_implementation = "eager"
    return config


# ---- text: the exported modules -----------------------------------------------------------


class TextEmbedder(nn.Module):
    """A BERT encoder: ``(input_ids, attention_mask) -> last_hidden_state`` (float32)."""

    def __init__(self, config) -> None:
        super().__init__()
        from transformers import BertModel

        self.bert = BertModel(config, add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(batch, seq)`` int64 ids and mask -> ``(batch, seq, hidden)`` float32."""
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class TextClassifier(nn.Module):
    """A BERT sequence classifier: ``(input_ids, attention_mask) -> logits`` (float32)."""

    def __init__(self, config) -> None:
        super().__init__()
        from transformers import BertForSequenceClassification

        self.model = BertForSequenceClassification(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(batch, seq)`` int64 ids and mask -> ``(batch, num_labels)`` float32."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def export_text_model(module: nn.Module) -> torch.export.ExportedProgram:
    """Export ``module`` with a dynamic batch (>= 1) and sequence length (1..MAX_LENGTH),
    without the traced source locations."""
    module.eval()
    generator = torch.Generator().manual_seed(SEED)
    ids = torch.randint(len(SPECIAL_TOKENS), 100, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    batch, seq = Dim("batch", min=1), Dim("seq", min=1, max=MAX_LENGTH)
    dims = {0: batch, 1: seq}
    with torch.no_grad():
        program = torch.export.export(
            module, (ids, mask), dynamic_shapes={"input_ids": dims, "attention_mask": dims}
        )
    for node in program.graph.nodes:  # source paths and line numbers: the file would depend
        node.meta.pop("stack_trace", None)  # on where the repository and venv are
    return program


# ---- text: the classification task ----------------------------------------------------------


def markdown_sentences(text: str) -> list[str]:
    """The prose of a markdown file, as sentences: paragraphs and list items are joined and
    split after ``.``, ``!`` or ``?``; headings and table rows count as one sentence each;
    code blocks are left out, and so are sentences of fewer than MIN_SENTENCE_WORDS words."""
    sentences: list[str] = []
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            sentences.extend(re.split(r"(?<=[.!?])\s+", " ".join(paragraph)))
            paragraph.clear()

    in_code = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            in_code = not in_code
        elif in_code:
            continue
        elif not stripped or stripped.startswith(("#", "|")):
            flush()
            if not re.fullmatch(r"[|\-: ]*", stripped):  # not a table rule
                sentences.append(stripped.strip("#| ").replace("|", " "))
        else:
            if re.match(r"([-*]|\d+\.)\s", stripped):  # a list item starts a new sentence
                flush()
                stripped = re.sub(r"^([-*]|\d+\.)\s+", "", stripped)
            paragraph.append(stripped)
    flush()
    return [s for s in sentences if len(s.split()) >= MIN_SENTENCE_WORDS]


def text_dataset() -> tuple[list[str], list[int]]:
    """Every sentence of ``docs/<label>.md`` for each label, with its label's index."""
    texts: list[str] = []
    labels: list[int] = []
    for index, label in enumerate(TEXT_LABELS):
        sentences = markdown_sentences((ROOT / "docs" / f"{label}.md").read_text("utf-8"))
        texts.extend(sentences)
        labels.extend([index] * len(sentences))
    return texts, labels


def encode(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded int64 ``(input_ids, attention_mask)`` for ``texts``, each truncated to
    MAX_LENGTH tokens (its final ``[SEP]`` kept)."""
    rows = [tokenizer.encode(text).ids for text in texts]
    sep = tokenizer.token_to_id("[SEP]")
    rows = [row if len(row) <= MAX_LENGTH else [*row[: MAX_LENGTH - 1], sep] for row in rows]
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def train_text_classifier(tokenizer, config) -> tuple[TextClassifier, float, float]:
    """Train the classifier on 80% of ``text_dataset()`` (stratified, fixed split); return it
    with its held-out accuracy and the majority-class baseline on the same held-out set."""
    from sklearn.model_selection import train_test_split

    texts, labels = text_dataset()
    x_train, x_test, y_train, y_test = train_test_split(
        texts, labels, test_size=TEXT_HELD_OUT_FRACTION, random_state=SEED, stratify=labels
    )
    torch.manual_seed(SEED)
    model = TextClassifier(config)
    optimiser = torch.optim.AdamW(model.parameters(), lr=TEXT_LEARNING_RATE, weight_decay=0.01)
    targets = torch.tensor(y_train)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(TEXT_EPOCHS):
        for batch in torch.randperm(len(x_train), generator=generator).split(TEXT_BATCH_SIZE):
            ids, mask = encode(tokenizer, [x_train[i] for i in batch])
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(ids, mask), targets[batch])
            loss.backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        predicted = model(*encode(tokenizer, x_test)).argmax(dim=1)
    accuracy = float((predicted == torch.tensor(y_test)).float().mean())
    baseline = max(y_test.count(i) for i in range(len(TEXT_LABELS))) / len(y_test)
    return model, accuracy, baseline


def embedder_from(classifier: TextClassifier, config) -> TextEmbedder:
    """The trained classifier's encoder (its pooler left out) as a ``TextEmbedder``."""
    embedder = TextEmbedder(config)
    encoder_state = {
        name: tensor
        for name, tensor in classifier.model.bert.state_dict().items()
        if not name.startswith("pooler.")
    }
    embedder.bert.load_state_dict(encoder_state, strict=True)
    return embedder.eval()


# ---- text: checks ----------------------------------------------------------------------------


def export_max_diff(exported: nn.Module, eager: nn.Module, vocab_size: int) -> float:
    """The largest |exported - eager| output difference over CHECK_BATCHES x CHECK_SEQS, on
    random ids, right-padded to random lengths (each row keeps at least one real token)."""
    generator = torch.Generator().manual_seed(SEED)
    worst = 0.0
    with torch.no_grad():
        for batch in CHECK_BATCHES:
            for seq in CHECK_SEQS:
                lengths = torch.randint(1, seq + 1, (batch, 1), generator=generator)
                mask = (torch.arange(seq) < lengths).to(torch.int64)
                ids = torch.randint(0, vocab_size, (batch, seq), generator=generator) * mask
                worst = max(worst, float((exported(ids, mask) - eager(ids, mask)).abs().max()))
    return worst


def padding_max_diff(module: nn.Module, tokenizer, texts: list[str], embed: bool) -> float:
    """The largest difference padding makes: each text alone (no padding) against the same
    text in a right-padded batch, over its real positions (``embed``) or its logits."""
    ids, mask = encode(tokenizer, texts)
    worst = 0.0
    with torch.no_grad():
        batched = module(ids, mask)
        for i, text in enumerate(texts):
            alone = module(*encode(tokenizer, [text]))[0]
            row = batched[i, : alone.shape[0]] if embed else batched[i]
            worst = max(worst, float((row - alone).abs().max()))
    return worst


def padding_texts() -> list[str]:
    """Texts of very different lengths for ``padding_max_diff`` (the empty text included)."""
    long_text = " ".join(markdown_sentences((ROOT / "docs" / "operations.md").read_text()))
    return ["", "ok", "Redis streams", "The batcher waits for a full batch.", long_text]


# ---- digits ------------------------------------------------------------------------------------


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, x_test, y_train, y_test) of scikit-learn's digits as uint8 ``(n, 8, 8)``
    pixels ``round(x * 255 / 16)``; the same fixed, stratified split as ``digits_mlp.pt``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)
    return train_test_split(  # type: ignore[no-any-return]
        images,
        digits.target,
        test_size=DIGITS_HELD_OUT_FRACTION,
        random_state=SEED,
        stratify=digits.target,
    )


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """The held-out digits: (X_test uint8 ``(n, 8, 8)``, y_test)."""
    _, x_test, _, y_test = digits_split()
    return x_test, y_test


def digits_accuracy(model: nn.Module, images: np.ndarray, targets: np.ndarray) -> float:
    """The fraction of ``images`` that ``model`` labels as ``targets``."""
    with torch.no_grad():
        predicted = model(torch.from_numpy(images)).argmax(dim=1).numpy()
    return float((predicted == targets).mean())


def train_digits_cnn() -> tuple[DigitsCNN, float]:
    """Train ``DigitsCNN`` on the training split; return it and its held-out accuracy."""
    x_train, x_test, y_train, y_test = digits_split()
    torch.manual_seed(SEED)
    model = DigitsCNN()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    images, targets = torch.from_numpy(x_train), torch.from_numpy(y_train).long()
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(DIGITS_EPOCHS):
        for batch in torch.randperm(len(images), generator=generator).split(64):
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(images[batch]), targets[batch])
            loss.backward()
            optimiser.step()
    model.eval()
    return model, digits_accuracy(model, x_test, y_test)


# ---- eager references (for tests) ---------------------------------------------------------------


def eager_text_model(name: str, weights_dir: Path = WEIGHTS_DIR) -> nn.Module:
    """The eager module ``weights/<name>.pt2`` was exported from (``text_embed_demo`` or
    ``text_cls_demo``): rebuilt from ``text_demo_config.json`` with the program's weights."""
    if name not in TEXT_MODEL_FILES:
        raise ValueError(f"unknown text model {name!r}: {sorted(TEXT_MODEL_FILES)}")
    config = load_bert_config(weights_dir / CONFIG_FILE)
    module = TextEmbedder(config) if name == "text_embed_demo" else TextClassifier(config)
    state = torch.export.load(weights_dir / TEXT_MODEL_FILES[name]).state_dict
    if set(state) != set(module.state_dict()):
        raise ValueError(f"{name}: the program's weight names do not match the eager module")
    module.load_state_dict(state, strict=True)
    return module.eval()


def eager_digits_cnn(weights_dir: Path = WEIGHTS_DIR) -> DigitsCNN:
    """``DigitsCNN`` with the weights of ``weights/digits_cnn.safetensors``."""
    from safetensors.torch import load_file

    model = DigitsCNN()
    model.load_state_dict(load_file(weights_dir / DIGITS_FILE), strict=True)
    return model.eval()


# ---- output ------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    """The file's sha256, as ``sha256sum`` prints it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def toml_entries(hashes: dict[str, str]) -> str:
    """The ``[[models]]`` entries that serve the three demo models (``hashes``: file -> sha256,
    pinned for the ``.pt2`` programs, which can run code when loaded)."""
    tokenizer = f'{{ file = "{TOKENIZER_FILE}", max_length = {MAX_LENGTH} }}'
    text_inputs = (
        "inputs = [\n"
        '  { name = "input_ids", dtype = "int64", shape = ["seq"], pad = 0 },\n'
        '  { name = "attention_mask", dtype = "int64", shape = ["seq"], pad = 0 },\n'
        "]\n"
        f"max_dims = {{ seq = {MAX_LENGTH} }}\n"
    )
    labels = ", ".join(f'"{label}"' for label in TEXT_LABELS)
    return (
        "[[models]]\n"
        'model_id = "text_embed_demo"\n'
        'model_type = "embedding"\n'
        'format = "export"\n'
        f'file = "{EMBED_FILE}"\n'
        f'sha256 = "{hashes[EMBED_FILE]}"\n'
        f"tokenizer = {tokenizer}\n"
        'options = { pooling = "mean", normalize = true }\n'
        f"{text_inputs}"
        f'outputs = [{{ name = "last_hidden_state", shape = ["seq", {HIDDEN_SIZE}] }}]\n'
        "\n[[models]]\n"
        'model_id = "text_cls_demo"\n'
        'model_type = "text-classification"\n'
        'format = "export"\n'
        f'file = "{CLS_FILE}"\n'
        f'sha256 = "{hashes[CLS_FILE]}"\n'
        f"tokenizer = {tokenizer}\n"
        f"options = {{ labels = [{labels}] }}\n"
        f"{text_inputs}"
        f'outputs = [{{ name = "logits", shape = [{len(TEXT_LABELS)}] }}]\n'
        "\n[[models]]\n"
        'model_id = "digits_cnn"\n'
        'model_type = "classification"\n'
        'format = "safetensors"\n'
        'architecture = "digits_cnn"\n'
        f'file = "{DIGITS_FILE}"\n'
        'inputs = [{ name = "image", dtype = "uint8", shape = [8, 8] }]\n'
        'outputs = [{ name = "logits", shape = [10] }]\n'
    )


# ---- main ----------------------------------------------------------------------------------------


def write_text_models(weights_dir: Path) -> dict[str, float]:
    """Train, export, save and check the tokenizer and both text models; return the
    measurements (accuracies and the largest differences found)."""
    tokenizer = train_tokenizer()
    tokenizer.save(str(weights_dir / TOKENIZER_FILE))
    config = bert_config(tokenizer.get_vocab_size())
    (weights_dir / CONFIG_FILE).write_text(config.to_json_string(use_diff=False))

    classifier, accuracy, baseline = train_text_classifier(tokenizer, config)
    embedder = embedder_from(classifier, config)
    results = {"text_cls_accuracy": accuracy, "text_cls_majority_baseline": baseline}
    for name, module in (("text_embed_demo", embedder), ("text_cls_demo", classifier)):
        path = weights_dir / TEXT_MODEL_FILES[name]
        torch.export.save(export_text_model(module), path)
        loaded = torch.export.load(path).module()
        eager = eager_text_model(name, weights_dir)
        vocab = tokenizer.get_vocab_size()
        results[f"{name}_export_vs_trained"] = export_max_diff(loaded, module, vocab)
        results[f"{name}_export_vs_rebuilt"] = export_max_diff(loaded, eager, vocab)
        embed, texts = name == "text_embed_demo", padding_texts()
        results[f"{name}_padding_eager"] = padding_max_diff(eager, tokenizer, texts, embed)
        results[f"{name}_padding_export"] = padding_max_diff(loaded, tokenizer, texts, embed)
    return results


def write_digits_cnn(weights_dir: Path) -> dict[str, float]:
    """Train and save ``DigitsCNN``; check the saved weights reload to the same accuracy."""
    from safetensors.torch import save_file

    model, accuracy = train_digits_cnn()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights_dir / DIGITS_FILE)
    reloaded = digits_accuracy(eager_digits_cnn(weights_dir), *digits_uint8())
    return {"digits_cnn_accuracy": accuracy, "digits_cnn_reloaded_accuracy": reloaded}


def main() -> None:
    """Write every demo model file into ``weights/``, check them, print what was made."""
    started = time.monotonic()
    torch.set_num_threads(1)  # results independent of the machine's core count
    torch.manual_seed(SEED)
    results = write_text_models(WEIGHTS_DIR)
    results.update(write_digits_cnn(WEIGHTS_DIR))
    for name, value in results.items():
        if ("padding" in name or "export_vs" in name) and value > TOLERANCE:
            raise SystemExit(f"check failed: {name} = {value:.3g} > {TOLERANCE}")
    files = [TOKENIZER_FILE, CONFIG_FILE, EMBED_FILE, CLS_FILE, DIGITS_FILE]
    hashes = {name: sha256_of(WEIGHTS_DIR / name) for name in files}
    for name in files:
        print(f"{hashes[name]}  {(WEIGHTS_DIR / name).stat().st_size:>9,d}  weights/{name}")
    for name, value in results.items():
        print(f"{name}: {value:.4g}")
    print(f"\n{toml_entries(hashes)}")
    print(f"done in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
