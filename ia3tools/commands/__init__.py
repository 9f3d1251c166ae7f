"""The commands, each a short orchestration of reading, planning, folding and writing. Their
public functions are re-exported by ``ia3tools`` itself."""
