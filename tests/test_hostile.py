"""Inputs a careless or hostile user gives: each refused in one line naming the file, row or field and the fix
(exit 2, no traceback, nothing written), or handled without the cost or the side effect it had.

JSONL rows without a key, a FIFO or garbage in place of an engine, a Ray address nothing listens on, a GQA
decoder with fewer positions than its target, negative thread counts, a 4 MB text line, train and eval rows
shared, an adapter config that names other modules than its tensors, the exporting machine's adapter path in
the manifest, and ONNX Runtime's telemetry files in the user's home."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, assert_one_line_error, make_labelled_adapters, make_peft_adapter, tree

LABELS = {"mood": ["neg", "pos"]}


@pytest.fixture(scope="module")
def bert_adapters(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    return make_labelled_adapters(tiny_dir("bert"), tmp_path_factory.mktemp("hostile") / "adapters", LABELS)


@pytest.fixture(scope="module")
def bert_folder(tiny_dir, bert_adapters, tmp_path_factory) -> Path:
    """A cpu-fp32 deployment of the tiny BERT with one classification task, exported through the CLI."""
    from conftest import export_folder

    out = tmp_path_factory.mktemp("hostile_dep") / "out"
    return export_folder(tiny_dir("bert"), {"mood": bert_adapters["mood"]}, out, "--threads", "1")


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the suite) when the body runs longer than ``seconds``."""
    def fail(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------- 1. JSONL rows
def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_later_jsonl_row_without_a_key_is_named_by_train_and_calibrate(tiny_dir, bert_adapters, tmp_path, cli):
    """Row 4 lacks "label" (train) or "text" (calibrate): one line naming the file, the line and the key; before,
    a KeyError traceback."""
    rows = [{"text": f"good {i}", "label": "pos"} for i in range(3)] + [{"text": "no label here"}]
    data = _jsonl(tmp_path / "train.jsonl", rows)
    res = cli("train", "--base", tiny_dir("bert"), "--train", data, "-o", tmp_path / "a", "--max-steps", "1")
    assert_one_line_error(res, "train.jsonl line 4", "'label'")
    assert not (tmp_path / "a").exists()

    cal = _jsonl(tmp_path / "cal.jsonl", [{"text": f"a calm text {i}"} for i in range(5)] + [{"sentence": "x"}])
    out = tmp_path / "q"
    res = cli("export", "--base", tiny_dir("bert"), "--adapter", f"mood={bert_adapters['mood']}",
              "--target", "cpu-int8-qdq", "--calibrate", cal, "-o", out)
    assert_one_line_error(res, "cal.jsonl line 6", "'text'")
    assert not out.exists()


# ------------------------------------------------------------------------------------------- 2. pack
def test_pack_refuses_a_fifo_or_garbage_engine_in_one_line(bert_folder, tmp_path, cli):
    """An engine replaced by a FIFO is refused at once (it hung the packer), garbage bytes with a consistent
    manifest are 'not an ONNX model' (a protobuf traceback before), and without one a sha256 mismatch."""
    manifest = json.loads((bert_folder / "manifest.json").read_text())
    engine = manifest["swap"]["engine"]

    fifo = tmp_path / "fifo"
    shutil.copytree(bert_folder, fifo)
    (fifo / engine).unlink()
    os.mkfifo(fifo / engine)
    with deadline(60):
        res = cli("pack", fifo, "-o", tmp_path / "b1")
    assert_one_line_error(res, engine, "not a regular file")
    assert not (tmp_path / "b1").exists()

    garbage = tmp_path / "garbage"
    shutil.copytree(bert_folder, garbage)
    size = manifest["files"][engine]["size"]
    data = (bytes(range(256)) * (size // 256 + 1))[:size]  # the recorded size: the bytes themselves are wrong
    (garbage / engine).write_bytes(data)
    res = cli("pack", garbage, "-o", tmp_path / "b2")
    assert_one_line_error(res, engine, "sha256")
    import hashlib

    m = json.loads((garbage / "manifest.json").read_text())
    m["files"][engine] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (garbage / "manifest.json").write_text(json.dumps(m))
    res = cli("pack", garbage, "-o", tmp_path / "b2")
    assert_one_line_error(res, engine, "not an ONNX model")
    assert not (tmp_path / "b2").exists()
    assert cli("pack", bert_folder, "-o", tmp_path / "b3").code == 0  # the untouched folder packs


# ------------------------------------------------------------------------------------------- 3. Ray
def test_a_ray_address_nothing_listens_on_fails_fast(tiny_dir, bert_adapters, tmp_path, cli):
    """A closed loopback port: one error line within seconds (ray.init retried it for minutes)."""
    pytest.importorskip("ray")
    from edgelora.errors import EdgeloraError
    from edgelora.pipeline.executors import make_executor

    port = _free_port()
    with deadline(60), pytest.raises(EdgeloraError, match=f"127.0.0.1:{port}: nothing answers"):
        make_executor("ray", 1, f"127.0.0.1:{port}")
    with pytest.raises(EdgeloraError, match="is not HOST:PORT"):
        make_executor("ray", 1, "127.0.0.1:notaport")

    shutil.copytree(bert_adapters["mood"], tmp_path / "mood")
    (tmp_path / "PIPELINE.toml").write_text(f'base = "{tiny_dir("bert")}"\ntargets = ["cpu-fp32"]\n'
                                            'output = "out"\ncache = "cache"\n[tasks.mood]\nadapter = "mood"\n')
    with deadline(120):
        res = cli("build", tmp_path / "PIPELINE.toml", "--executor", "ray", "--ray-address", f"127.0.0.1:{port}")
    assert_one_line_error(res, "--ray-address", f"127.0.0.1:{port}")
    assert not (tmp_path / "out").exists() or tree(tmp_path / "out") == []


# ------------------------------------------------------------------------------------------- 4. GQA positions
def test_a_gqa_export_of_a_decoder_with_fewer_positions_is_refused_before_work(tmp_path, cli):
    pytest.importorskip("onnxruntime_genai", reason="the genai extra (onnxruntime-genai) is not installed")
    import transformers as tf

    from edgelora.tiny import char_tokenizer

    config = tf.LlamaConfig(vocab_size=512, pad_token_id=0, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64, bos_token_id=5, eos_token_id=5)
    torch.manual_seed(0)
    base = tmp_path / "base"
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(str(base), safe_serialization=True)
    char_tokenizer("llama").save_pretrained(str(base))
    adapter = make_peft_adapter(base, tmp_path / "t1", task_type="CAUSAL_LM", target_modules=["q_proj"], r=4)
    for target in ("cpu-fp32-gqa", "cpu-int4-gqa"):
        out = tmp_path / target
        res = cli("export", "--base", base, "--adapter", f"t1={adapter}", "--target", target, "-o", out)
        assert_one_line_error(res, target, "128 positions", "has 64", "sequence ≤ 64")
        assert not out.exists()


# ------------------------------------------------------------------------------------------- 5. threads
def test_negative_threads_are_refused_and_zero_keeps_its_meaning(tiny_dir, bert_adapters, bert_folder, tmp_path,
                                                                 cli):
    from edgelora.errors import InputError
    from edgelora.runtime import Runtime

    for args in (("run", bert_folder, "--text", "hello"), ("bench", bert_folder, "--no-peft"),
                 ("export", "--base", tiny_dir("bert"), "--adapter", f"mood={bert_adapters['mood']}",
                  "-o", tmp_path / "e"),
                 ("train", "--base", tiny_dir("bert"), "--train", REPO / "examples/data/sst2-dev-500.tsv",
                  "-o", tmp_path / "t")):
        res = cli(*args, "--threads", "-1")
        assert_one_line_error(res, "threads")
    assert tree(tmp_path) == []
    for bad in (-1, -8, 1.5, True):
        with pytest.raises(InputError, match="threads"):
            Runtime.open(bert_folder, threads=bad)
    ids = np.array([[2, 40, 41, 42, 3]], np.int64)
    default = Runtime.open(bert_folder).run(input_ids=ids, task="mood")
    zero = Runtime.open(bert_folder, threads=0).run(input_ids=ids, task="mood")  # 0: ONNX Runtime's own choice
    assert default.keys() == zero.keys() and all(np.array_equal(default[k], zero[k]) for k in default)


# ------------------------------------------------------------------------------------------- 6. long texts
class _Recording:
    """A tokenizer proxy that records the length of every text it is handed."""

    def __init__(self, inner, lengths: list[int]) -> None:
        self.inner, self.lengths = inner, lengths

    def __call__(self, texts, *args, **kwargs):
        self.lengths += [len(t) for t in ([texts] if isinstance(texts, str) else texts)]
        return self.inner(texts, *args, **kwargs)

    def encode(self, text, *args, **kwargs):
        self.lengths.append(len(text))
        return self.inner.encode(text, *args, **kwargs)


def _byte_level_bpe():
    """A byte-level BPE (GPT-2's pre-tokenizer) trained here on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the film is a good one, and the plot is a dull mess", "witty, seductive movie with heart"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel
                                                        .alphabet()))
    return tok


def test_a_4mb_line_is_cut_before_it_is_tokenized_to_the_same_ids(tmp_path):
    """The runtime's text path and the calibration batches hand the tokenizer a bounded prefix (a 4 MB line was
    tokenized whole: 1.5 GB), and the ids are the whole text's, for WordPiece and byte-level BPE alike, also
    where long whitespace runs make characters a poor bound for tokens."""
    from transformers import AutoTokenizer

    from edgelora.base import bundled_base_path
    from edgelora.export.calibration import _encode
    from edgelora.runtime.text import Tokenizer, clip_text

    minilm = bundled_base_path()
    line = ("the film is a good one, and the plot is a dull mess " * 80_000)[:4_000_000]
    rt = Tokenizer((minilm / "tokenizer.json").read_bytes(), (minilm / "tokenizer_config.json").read_bytes(), 128,
                   "w1")
    lengths: list[int] = []
    rt._tok = _Recording(rt._tok, lengths)
    ids = rt.encode(line)["input_ids"]
    assert max(lengths) < 20_000, max(lengths)
    assert np.array_equal(ids, rt.encode(line[:2_000])["input_ids"]) and ids.shape == (1, 128)

    hf = AutoTokenizer.from_pretrained(str(minilm))
    lengths.clear()
    batch = _encode(_Recording(hf, lengths), [line, "short one"], 128, fixed=True)
    assert max(lengths) < 20_000, max(lengths)
    ref = hf([line[:2_000], "short one"], padding="max_length", truncation=True, max_length=128, return_tensors="np")
    assert np.array_equal(batch["input_ids"], ref["input_ids"])

    # exactness where the cut matters: medium texts (tokenized whole as the reference), whitespace-heavy ones
    bpe = _byte_level_bpe()
    texts = ["a" + " " * 300_000 + "the plot " * 100, "witty  movie,\tgood " * 2_000, "x" * 50_000 + " the film" * 9,
             "the film is a good one " * 3_000]
    for text in texts:
        for tok in (rt._tok.inner, bpe):
            tok.no_truncation()
            whole = tok.encode(text, add_special_tokens=False).ids[:100]
            tok.enable_truncation(100)
            clipped = clip_text(text, 100, lambda t, k=tok: len(k.encode(t, add_special_tokens=False).ids))
            assert tok.encode(clipped, add_special_tokens=False).ids == whole
            assert len(clipped) <= len(text)


# ------------------------------------------------------------------------------------------- 7. overlaps
def test_train_and_eval_selections_that_share_rows_are_refused(tiny_dir, tmp_path, cli):
    rows = ["sentence\tlabel"] + [f"text number {i}\t{'pos' if i % 2 else 'neg'}" for i in range(200)]
    (tmp_path / "d.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")

    def pipeline(eval_offset: int) -> Path:
        (tmp_path / "PIPELINE.toml").write_text(
            f'base = "{tiny_dir("bert")}"\ntargets = ["cpu-fp32"]\noutput = "out"\ncache = "cache"\n'
            f'[tasks.mood]\neval = {{ file = "d.tsv", rows = 50, offset = {eval_offset} }}\n'
            '[tasks.mood.train]\ndata = { file = "d.tsv", rows = 100 }\nmax_steps = 1\n', encoding="utf-8")
        return tmp_path / "PIPELINE.toml"

    res = cli("build", pipeline(60), "--prepare")
    assert_one_line_error(res, "tasks.mood", "40 of its 50 eval rows", "d.tsv")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache" / "train").exists()

    from edgelora.pipeline import Build

    Build(pipeline(100), quiet=True)  # disjoint: accepted (checked when the build is set up)


# ------------------------------------------------------------------------------------------- 8. target_modules
@pytest.mark.parametrize("targets, says", [
    (["query", "value", "key"], ["self.key'", "no LoRA tensors", "fresh LoRA layer"]),
    (["query"], ["self.value'", "does not name it", "PEFT would drop them"]),
    (["nonexistent"], ["self.query'", "does not name it"]),
])
def test_target_modules_that_disagree_with_the_tensors_are_refused(tiny_dir, tmp_path, cli, targets, says):
    """PEFT gives a targeted module without tensors a fresh LoRA layer and drops tensors of a module it does not
    target (or refuses when nothing matches): a merge of the tensors would not be PEFT's model."""
    import transformers
    from peft import PeftModel

    adapter = make_peft_adapter(tiny_dir("bert"), tmp_path / "a", task_type="FEATURE_EXTRACTION", r=4,
                                target_modules=["query", "value"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["target_modules"] = targets
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    res = cli("merge", "--base", tiny_dir("bert"), "--adapter", adapter, "-o", tmp_path / "m")
    assert_one_line_error(res, "target_modules", *says)
    assert not (tmp_path / "m").exists()
    # PEFT's own reading of the same folder: not the model the tensors describe
    with pytest.warns(UserWarning) if targets != ["nonexistent"] else pytest.raises(ValueError):
        PeftModel.from_pretrained(transformers.AutoModel.from_pretrained(str(tiny_dir("bert"))), str(adapter))


# ------------------------------------------------------------------------------------------- 9. adapter path
def test_the_manifest_records_no_machine_path_and_old_folders_still_open(bert_folder, bert_adapters, tmp_path):
    from conftest import schema_validator

    from edgelora.format import read_manifest
    from edgelora.runtime import Runtime

    raw = json.loads((bert_folder / "manifest.json").read_text())
    recorded = raw["tasks"]["mood"]["adapter_path"]
    assert recorded == "mood" and not Path(recorded).is_absolute()  # outside the working directory: its name
    schema_validator().validate(raw)
    old = tmp_path / "old"
    shutil.copytree(bert_folder, old)
    raw["tasks"]["mood"]["adapter_path"] = str(bert_adapters["mood"].resolve())  # as folders before recorded
    (old / "manifest.json").write_text(json.dumps(raw))
    schema_validator().validate(raw)
    assert read_manifest(old).tasks["mood"].adapter_path == str(bert_adapters["mood"].resolve())
    assert Runtime.open(old).tasks == ["mood"]


def test_adapter_record_is_relative_inside_the_working_directory(tmp_path, monkeypatch):
    from edgelora.format.layout import adapter_record

    (tmp_path / "examples" / "sst2").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert adapter_record("examples/sst2") == "examples/sst2"
    assert adapter_record(tmp_path / "examples" / "sst2") == "examples/sst2"
    monkeypatch.chdir(tmp_path / "examples")
    assert adapter_record(tmp_path / "elsewhere" / "a1") == "a1"


# ------------------------------------------------------------------------------------------- 10. telemetry
def test_opening_a_folder_leaves_nothing_in_the_home_folder(bert_folder, tmp_path):
    """ONNX Runtime 1.2x writes a device id and an event database under ~/.cache/Microsoft unless
    ORT_DISABLE_TELEMETRY is set before it is imported; importing edgelora sets it (an explicit value wins)."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    code = ("import sys, numpy as np\nfrom edgelora.runtime import Runtime\nrt = Runtime.open(sys.argv[1])\n"
            "print(rt.run(input_ids=np.array([[2, 40, 41, 3]]), task='mood')['logits'].shape)")
    done = subprocess.run([sys.executable, "-c", code, str(bert_folder)], env={**env, "HOME": str(home)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "(1, 2)" in done.stdout
    assert tree(home) == []
