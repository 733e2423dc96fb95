"""The prompt format: what the teacher is asked, and what the student trains on.

An R1-style instruction asks for step-by-step reasoning that ends in one fixed line, `The final answer is X.`.
A 135M teacher does not follow an instruction alone (asked for `<answer>` tags it used them 0 times in 128), but it
copies worked examples well, so the `worked_examples` style puts two solved problems of the same task before the
question as earlier chat turns. Those examples are for the teacher only: the student trains on the instruction and
the question (`student_messages`), so its sequences stay short and it learns the format from the completions.
`chat_token_ids` is the one place a conversation becomes token ids (teacher, soft targets, student, serving).

Few-shot questions are written in each task's own wording and are excluded from both data splits (see
`sources.reasoning_gym_prompts`), so evaluation never shows a question that the prompt already answered.
"""

from __future__ import annotations

from typing import Literal

Message = dict[str, str]
PromptStyle = Literal["worked_examples", "instruction"]
# What the teacher reads before the student's tokens when it scores them (`distill`, `refine`): `best`, its best
# prompt (the task's worked examples, which the student never sees: context distillation); `same`, the student's
# own prompt.
TeacherContext = Literal["best", "same"]

INSTRUCTION = (
    "Solve the problem. Think step by step, then finish with one line of the form "
    '"The final answer is X." where X is only the answer.'
)
FINAL = "The final answer is {answer}."

# Two solved problems per task, in the task's own question wording; the reasoning is short on purpose: a small
# teacher imitates the length it sees.
WORKED_EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "basic_arithmetic": [
        ("Calculate 7 - 2.", "7 - 2 = 5. The final answer is 5."),
        ("Calculate 3 + 8.", "3 + 8 = 11. The final answer is 11."),
    ],
    "chain_sum": [
        (
            "State the final answer to the following arithmetic problem: 4 + 2 + 5 =",
            "4 + 2 = 6. 6 + 5 = 11. The final answer is 11.",
        ),
        ("State the final answer to the following arithmetic problem: 9 - 3 =", "9 - 3 = 6. The final answer is 6."),
    ],
    "letter_counting": [  # no letter-by-letter spelling: this teacher cannot spell and loops when it tries
        (
            'How many times does the letter "o" appear in the text: "good day"?',
            'In "good day" the letter "o" appears 2 times. The final answer is 2.',
        ),
        (
            'How many times does the letter "a" appear in the text: "green apple"?',
            'In "green apple" the letter "a" appears 1 time. The final answer is 1.',
        ),
    ],
    "spell_backward": [
        (
            "Spell this word backward (example: sun -> nus): lamp",
            "lamp is l-a-m-p. Backward: p-m-a-l. The final answer is pmal.",
        ),
        (
            "Spell this word backward (example: sun -> nus): tree",
            "tree is t-r-e-e. Backward: e-e-r-t. The final answer is eert.",
        ),
    ],
}


def few_shot_questions() -> set[str]:
    """Every question the prompt itself answers (kept out of both data splits)."""
    return {q for examples in WORKED_EXAMPLES.values() for q, _ in examples}


def student_messages(question: str) -> list[Message]:
    """The conversation the student trains on and is evaluated with: the instruction and the question."""
    return [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": question}]


def chat_token_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation in the tokenizer's chat template, ending at the assistant's turn.

    transformers 5 returns a `BatchEncoding` from `apply_chat_template(tokenize=True)`, older versions a list.
    """
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def teacher_messages(task: str, question: str, style: PromptStyle = "worked_examples") -> list[Message]:
    """The conversation the teacher answers: the student's, with the task's worked examples before the question.

    Tasks without built-in examples fall back to the instruction alone.
    """
    messages = [{"role": "system", "content": INSTRUCTION}]
    if style == "worked_examples":
        for q, a in WORKED_EXAMPLES.get(task, []):
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return [*messages, {"role": "user", "content": question}]


def teacher_context_ids(tokenizer, task: str, question: str, context: TeacherContext) -> list[int]:
    """Token ids of the conversation the teacher reads before the student's answer when it scores it, ending at the
    assistant's turn: with `best` the teacher's own best prompt (its worked examples, then the question), with
    `same` the student's prompt. `distill` and `refine` both build the teacher's context here."""
    if context == "best":
        return chat_token_ids(tokenizer, teacher_messages(task, question))
    if context == "same":
        return chat_token_ids(tokenizer, student_messages(question))
    raise ValueError(f"unknown teacher context {context!r}: expected 'best' or 'same'")


def canonical_completion(completion: str, answer: str, method: str) -> str:
    """An accepted completion in the one answer format the student learns.

    A completion whose answer was found only as its last number or word gets the fixed final line appended; one
    that already ends in the fixed line (or a tag) is kept as written.
    """
    text = completion.strip()
    if method == "last":
        text = f"{text.rstrip('.')}. {FINAL.format(answer=answer)}" if text else FINAL.format(answer=answer)
    return text
