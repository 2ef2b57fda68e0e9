"""TRL's SFTTrainer with peft_config=SVFitConfig(...) in place of a LoraConfig (issue 16, part 2): trains, saves,
reloads and generates on a tiny local Llama with a tokenizer built here (no downloads). SFTConfig's defaults stay on
(bf16 autocast, gradient checkpointing), as a TRL user gets them. The real-model run is examples/trl_sft.py."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl", reason="needs the trl extra: pip install 'svfit[trl]'")
datasets = pytest.importorskip("datasets", reason="needs the trl extra: pip install 'svfit[trl]'")

from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

import svfit  # noqa: E402
from svfit.tuner.checkpoint import FINGERPRINT_KEY  # noqa: E402

WORDS = "the a cat dog sat on mat ran fast slow big small red blue is was and".split()
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def tokenizer(extra_special=()):
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    if extra_special:
        out.add_special_tokens({"additional_special_tokens": list(extra_special)})
    return out


def tiny_llama(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)
    return LlamaForCausalLM(cfg)


def sft_args(tmp_path, **kw):
    return trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4,
                         learning_rate=2e-4, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                         max_length=16, **kw)


TEXTS = ["the cat sat on the mat", "a dog ran fast", "the big red dog was slow", "a small blue cat is fast"] * 4


def test_sft_trainer_trains_saves_reloads_and_generates(tmp_path):
    args = sft_args(tmp_path)
    assert args.gradient_checkpointing and args.bf16  # TRL's defaults, kept on purpose
    trainer = trl.SFTTrainer(
        model=tiny_llama(), args=args, train_dataset=datasets.Dataset.from_dict({"text": TEXTS}),
        processing_class=tokenizer(), peft_config=svfit.SVFitConfig(target_modules=["q_proj", "v_proj"]),
    )
    model = trainer.model
    assert isinstance(model, PeftModel) and model.peft_config["default"].peft_type == svfit.SVFitConfig().peft_type
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("svfit_vector" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())  # no cast of the singular values by TRL

    trainer.train()
    changed = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p.detach(), trainable[n])]
    assert changed == list(trainable)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))

    trainer.save_model(str(tmp_path / "adapter"))
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    vectors = {k for k in saved if k.endswith("svfit_vector")}
    assert len(vectors) == len(trainable) and FINGERPRINT_KEY in saved  # plus bases only where reload could drift

    # the trainer's model keeps accelerate's bf16 autocast wrapper on its forward, so compare what was trained (the
    # singular values, bit for bit) and run the reloaded adapter in float32
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    reloaded = {n: p for n, p in loaded.named_parameters() if "svfit_vector" in n}
    assert reloaded.keys() == trainable.keys()
    assert all(torch.equal(reloaded[n], p.detach()) for n, p in model.named_parameters() if n in reloaded)
    ids = tokenizer()("the cat", return_tensors="pt").input_ids
    with torch.no_grad():
        assert not torch.equal(loaded(ids).logits, tiny_llama().eval()(ids).logits)  # the adapter acts
        generated = loaded.generate(input_ids=ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, ids.shape[1] + 6) and torch.equal(generated[:, : ids.shape[1]], ids)


def test_sft_trainer_cloning_a_chat_template_trains_the_added_tokens(tmp_path):
    """With chat_template_path, SFTTrainer adds the source tokenizer's tokens and sets
    peft_config.trainable_token_indices (a LoraConfig field SVFitConfig now has) and modules_to_save=['lm_head']."""
    source = tokenizer(["<|im_start|>", "<|im_end|>"])
    source.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    source.eos_token = "<|im_end|>"
    source.save_pretrained(tmp_path / "source")
    chats = [[{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat on the mat"}]] * 8
    config = svfit.SVFitConfig(target_modules=["q_proj", "v_proj"])
    trainer = trl.SFTTrainer(
        model=tiny_llama(tie_word_embeddings=False), args=sft_args(tmp_path, chat_template_path=str(tmp_path / "source")),
        train_dataset=datasets.Dataset.from_dict({"messages": chats}), processing_class=tokenizer(),
        peft_config=config,
    )
    assert config.trainable_token_indices and config.modules_to_save == ["lm_head"]
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert any("trainable_tokens_delta" in k for k in keys) and any(k.endswith("svfit_vector") for k in keys)
