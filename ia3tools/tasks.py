"""One table of model tasks: how PEFT names a task, what optimum and ia3tools call it, which
transformers class loads it, which architecture names it, and what its export outputs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str  # ia3tools' own name (kept as an alias)
    optimum: str  # optimum's task name
    peft: str | None  # the adapter config's task_type
    auto_class: str  # the transformers class that loads it
    suffixes: tuple[str, ...]  # architecture names of this task end in one of these
    head: str | None  # the class suffix a bare backbone takes when it gains this task's head
    output: str  # the model output an export returns
    inputs: str  # "text", "seq2seq" or "image"


TASKS: tuple[Task, ...] = (
    Task("causal-lm", "text-generation", "CAUSAL_LM", "AutoModelForCausalLM", ("ForCausalLM", "LMHeadModel"),
         "ForCausalLM", "logits", "text"),
    Task("seq2seq-lm", "text2text-generation", "SEQ_2_SEQ_LM", "AutoModelForSeq2SeqLM",
         ("ForConditionalGeneration", "ForSeq2SeqLM"), "ForConditionalGeneration", "logits", "seq2seq"),
    Task("sequence-classification", "text-classification", "SEQ_CLS", "AutoModelForSequenceClassification",
         ("ForSequenceClassification",), "ForSequenceClassification", "logits", "text"),
    Task("token-classification", "token-classification", "TOKEN_CLS", "AutoModelForTokenClassification",
         ("ForTokenClassification",), "ForTokenClassification", "logits", "text"),
    Task("question-answering", "question-answering", "QUESTION_ANS", "AutoModelForQuestionAnswering",
         ("ForQuestionAnswering",), "ForQuestionAnswering", "start_logits", "text"),
    Task("feature-extraction", "feature-extraction", "FEATURE_EXTRACTION", "AutoModel", ("Model",), None,
         "last_hidden_state", "text"),
    Task("image-classification", "image-classification", None, "AutoModelForImageClassification",
         ("ForImageClassification",), None, "logits", "image"),
)

EXPORTABLE = tuple(t for t in TASKS if t.name != "question-answering")  # two outputs: not yet exported


def task_named(name: str) -> Task | None:
    """A task by ia3tools' or optimum's name."""
    return next((t for t in TASKS if name in (t.name, t.optimum)), None)


def task_of_peft(task_type: str | None) -> Task | None:
    return next((t for t in TASKS if task_type is not None and t.peft == task_type), None)


def task_of_architecture(arch: str) -> Task | None:
    """The task an architecture name (``LlamaForCausalLM``, ``BertModel``) is for."""
    for task in TASKS:
        if any(arch.endswith(s) for s in task.suffixes):
            return task
    return None


def export_task_names() -> list[str]:
    """Every name ``export-onnx --task`` accepts: optimum's, then ia3tools' own aliases."""
    names = [t.optimum for t in EXPORTABLE]
    return names + [t.name for t in EXPORTABLE if t.name not in names]
