"""Evaluation: zero-shot classification, retrieval, counting and compositionality, with a report.

    vlp eval --model M [--weights W | --random-init] --suite S --out DIR
    vlp eval compare A/report.json B/report.json [--out DIR]

The command line lives in vlp.app; this package does the work. Modules, one idea each:

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
    synthetic  synthetic benchmark sets from vlp.core.synth, in the public formats, cached
    report     report.html from the report dict (each task class draws its own section)
    plots      matplotlib figures as inline PNG; markup: the HTML pieces report and compare share
    compare    two reports side by side
    tasks/     one module per task type: zeroshot, retrieval, counting, sugarcrepe, aro, winoground;
               base (the Task interface), pairs (the paired-caption protocol SugarCrepe and ARO share)
"""
