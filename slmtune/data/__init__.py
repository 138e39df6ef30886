"""Training data, stage by stage:

formats.py    the JSONL formats (chat, prompt_completion, text), reading lines, per-example checks
validate.py   `slmtune data validate`: every problem with a stable code and file:line; read_records
convert.py    `slmtune data convert`: Alpaca, ShareGPT, CSV, datasets folders -> JSONL
tokenize.py   examples -> token ids and shifted targets with the model's chat template
dataset.py    build_datasets: the recipe's data section -> tokenized train / validation examples
batching.py   packing into rows, micro-batches, collation
"""
