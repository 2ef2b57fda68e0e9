"""SVFit through TRL's SFTTrainer on a real pre-trained model: the LoRA recipe with SVFitConfig in place of LoraConfig.

SmolLM2-135M-Instruct (the project's offline copy) learns to answer "positive"/"negative" for Rotten Tomatoes reviews
from a few chat examples held in a locally built ``datasets.Dataset``. The script trains a few steps, saves the
adapter, reloads it in a fresh model and generates; it prints held-out accuracy before/after, the losses, the
reload check and the cost. A manual check, not a test (about 15 minutes on 2 busy CPU cores):

    python examples/trl_sft.py                     # 12 steps of batch 4 (48 reviews), 48 held-out reviews
    python examples/trl_sft.py --steps 40 --batch-size 8 --eval 200 --json out.json

examples/results/trl_sft-smollm2.json is the default run on this project's machine (x86_64, 2 cores, load ~8).

Needs the trl extra (pip install 'svfit[trl]') and the SmolLM2 asset (setup.sh installs both).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import svfit
from svfit.assets import load_rotten_tomatoes, smollm2_checkpoint
from svfit.tasks.lm import PROMPT, WORDS


def chat(review: str) -> list[dict]:
    return [{"role": "user", "content": PROMPT.format(review=review)}]


@torch.no_grad()
def accuracy(model, tokenizer, texts, labels, batch_size=16) -> float:
    model.eval()
    tokenizer.padding_side = "left"
    correct = 0
    for i in range(0, len(texts), batch_size):
        prompts = [tokenizer.apply_chat_template(chat(t), tokenize=False, add_generation_prompt=True)
                   for t in texts[i:i + batch_size]]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        for answer, y in zip(answers, labels[i:i + batch_size]):
            correct += answer.strip().lower().startswith(WORDS[y])
    return correct / len(texts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a local causal-LM checkpoint (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4,
                        help="LoRA's usual rate works: SVFitConfig.scaling sets the singular values' step unit")
    parser.add_argument("--eval", type=int, default=48, help="held-out reviews scored before and after")
    parser.add_argument("--out", type=Path, default=None, help="where to keep the run (default: a temporary dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()

    torch.manual_seed(0)
    checkpoint = str(args.model or smollm2_checkpoint())
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    train_x, train_y, test_x, test_y = load_rotten_tomatoes("sentiment", seed=0)
    n_train = args.steps * args.batch_size
    # conversational prompt-completion rows: SFTTrainer computes the loss on the completion (the answer) only
    data = Dataset.from_dict({
        "prompt": [chat(t) for t in train_x[:n_train]],
        "completion": [[{"role": "assistant", "content": WORDS[y]}] for y in train_y[:n_train]],
    })
    test_x, test_y = test_x[:args.eval], test_y[:args.eval]

    out = args.out or Path(tempfile.mkdtemp(prefix="svfit-trl-"))
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    acc_before = accuracy(base, tokenizer, test_x, test_y)

    # --- the LoRA recipe; the only change is the config class ------------------------------------------------------
    peft_config = svfit.SVFitConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"])
    sft_args = SFTConfig(
        output_dir=str(out / "run"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=5, save_strategy="no", report_to=[],
        max_length=192,
        use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(),  # bf16 autocast is slow on most CPUs
    )
    trainer = SFTTrainer(model=base, args=sft_args, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config)
    # ---------------------------------------------------------------------------------------------------------------
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
    trainer.save_model(str(out / "adapter"))
    trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "svfit_vector" in n}

    # reload onto a fresh copy of the base (what a user does in another process) and generate
    t0 = time.perf_counter()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32),
                                       out / "adapter")
    load_s = time.perf_counter() - t0
    same = all(torch.equal(p, trained[n]) for n, p in loaded.named_parameters() if "svfit_vector" in n)
    acc_after = accuracy(loaded, tokenizer, test_x, test_y)
    tokenizer.padding_side = "left"
    sample_prompt = tokenizer.apply_chat_template(chat(test_x[0]), tokenize=False, add_generation_prompt=True)
    sample_ids = tokenizer(sample_prompt, return_tensors="pt", add_special_tokens=False)
    generated = loaded.generate(**sample_ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    sample = tokenizer.decode(generated[0, sample_ids["input_ids"].shape[1]:], skip_special_tokens=True)
    adapter_bytes = os.path.getsize(out / "adapter" / "adapter_model.safetensors")

    result = {
        "model": checkpoint, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "train_examples": n_train, "eval_examples": len(test_x), "trainable_params": trainable,
        "losses_every_5_steps": losses, "train_seconds": round(train_s, 1), "load_seconds": round(load_s, 2),
        "accuracy_before": round(acc_before, 4), "accuracy_after_reload": round(acc_after, 4),
        "reloaded_singular_values_bit_exact": same, "adapter_file_bytes": adapter_bytes,
        "sample": {"review": test_x[0], "label": WORDS[test_y[0]], "generated": sample},
        "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
