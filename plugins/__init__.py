"""First-party fiqa-gate plugins (installed as `fiqa_gate_plugins`), loaded through the
`fiqa_gate` entry-point group exactly as third-party plugins are."""
