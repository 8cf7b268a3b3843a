"""Evaluation against toy-town ground truth: metrics, the judge segmenter, the quality benchmark."""
