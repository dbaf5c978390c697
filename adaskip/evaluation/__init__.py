"""Quality of skip plans against the full model: perplexity / agreement / KL, passkey and needle
retrieval, LongBench-format tasks, the `adaskip eval` harness and its report."""
