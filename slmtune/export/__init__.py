"""Exports of a finished run, one module per format.

merged.py   the adapter merged into its base: a standalone Hugging Face model (`--format merged`)
onnx.py     ONNX Runtime GenAI (`--format onnx`) and the parity check every format reports
kaito.py    the LoRA adapter as a Kaito adapter image build context + Workspace YAML (`--format kaito`)
"""
