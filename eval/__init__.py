"""Evaluation: zero-shot classification, retrieval, counting and compositionality, with a report.

    vlp eval --model M [--weights W | --random-init] --suite S --out DIR
    vlp eval compare A/report.json B/report.json [--out DIR]

Modules, one idea each:

    cli        the `vlp eval` subcommand (argparse)
    runner     suite -> tasks -> features -> report.json / report.html / skipped.jsonl
    suite      the suite YAML, validated with pydantic before any model is loaded
    models     --model/--weights resolution, safe weight loading, the `Encoder`
    features   FeatureStore: each image and text encoded once per run, cached by key
    parallel   strided split of encoding across ranks, all-gather back (gloo or nccl)
    images     ImageRef (path / URL / tar member, optional crop) and failure-tolerant loading
    wds        webdataset tar shards (CLIP_benchmark's layout and ours) as lazy ImageRefs
    metrics    pure metric functions on score matrices (ties count against the model)
    templates  prompt templates and CLIP prompt-ensemble class embeddings
    shuffle    ARO word-order perturbations without spaCy/nltk
    synthetic  synthetic benchmark sets from data_tools.synth, in the public formats, cached
    report     report.html from the report dict; plots: matplotlib figures as inline PNG
    compare    two reports side by side
    tasks/     one module per task type: zeroshot, retrieval, counting, sugarcrepe, aro, winoground
"""
