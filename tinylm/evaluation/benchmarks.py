"""Readers for local benchmark files in their official layouts, and the prompts built from them.

Why a separate module: the scoring in `tinylm/evaluation/evaluate.py` is the same for every multiple-choice
benchmark; only the files and the prompt wording differ. Everything here is pure Python (csv/json),
so the layouts can be tested without a model.

Layouts (see docs/eval.md for where to download the full sets):
  C-Eval (Huang et al. 2023)   {dev,val,test}/{subject}_{split}.csv, header id,question,A,B,C,D,answer[,explanation]
  CMMLU  (Li et al. 2023)      {dev,test}/{subject}.csv, header ,Question,A,B,C,D,Answer (leading index column)
  MMLU   (Hendrycks et al. 2021) {dev,val,test}/{subject}_{split}.csv WITHOUT header: question,A,B,C,D,answer
                               or JSONL rows {"question", "choices": [...], "answer": int, "subject"?}
  generic JSONL                {"question", "choices": [...], "answer": "B" | 1, "subject"?}
  gen (GSM8K-style) JSONL      {"question", "answer"} with the final answer after "####"
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "eval"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SPLITS = ("dev", "val", "validation", "test", "train")

# Default split evaluated for each benchmark (C-Eval hides test answers, so it reports on val).
DEFAULT_SPLIT = {"ceval": "val", "cmmlu": "test", "mmlu": "test", "mcq": "test"}
BUNDLED = {
    "ceval": ASSETS / "ceval",
    "cmmlu": ASSETS / "cmmlu",
    "mmlu": ASSETS / "mmlu",
    "mcq": ASSETS / "mcq.jsonl",
    "gen": ASSETS / "gsm8k.jsonl",
    "ppl": ASSETS / "ppl.txt",
}

# C-Eval subject keys -> Chinese names used in the official prompt.
CEVAL_SUBJECTS_ZH = {
    "computer_network": "计算机网络", "operating_system": "操作系统", "computer_architecture": "计算机组成",
    "college_programming": "大学编程", "college_physics": "大学物理", "college_chemistry": "大学化学",
    "advanced_mathematics": "高等数学", "probability_and_statistics": "概率统计",
    "discrete_mathematics": "离散数学", "electrical_engineer": "注册电气工程师",
    "metrology_engineer": "注册计量师", "high_school_mathematics": "高中数学",
    "high_school_physics": "高中物理", "high_school_chemistry": "高中化学", "high_school_biology": "高中生物",
    "middle_school_mathematics": "初中数学", "middle_school_biology": "初中生物",
    "middle_school_physics": "初中物理", "middle_school_chemistry": "初中化学",
    "veterinary_medicine": "兽医学", "college_economics": "大学经济学", "business_administration": "工商管理",
    "marxism": "马克思主义基本原理", "mao_zedong_thought": "毛泽东思想和中国特色社会主义理论体系概论",
    "education_science": "教育学", "teacher_qualification": "教师资格", "high_school_politics": "高中政治",
    "high_school_geography": "高中地理", "middle_school_politics": "初中政治",
    "middle_school_geography": "初中地理", "modern_chinese_history": "近代史纲要",
    "ideological_and_moral_cultivation": "思想道德修养与法律基础", "logic": "逻辑学", "law": "法学",
    "chinese_language_and_literature": "中国语言文学", "art_studies": "艺术学",
    "professional_tour_guide": "导游资格", "legal_professional": "法律职业资格",
    "high_school_chinese": "高中语文", "high_school_history": "高中历史", "middle_school_history": "初中历史",
    "civil_servant": "公务员", "sports_science": "体育学", "plant_protection": "植物保护",
    "basic_medicine": "基础医学", "clinical_medicine": "临床医学", "urban_and_rural_planner": "注册城乡规划师",
    "accountant": "注册会计师", "fire_engineer": "注册消防工程师",
    "environmental_impact_assessment_engineer": "环境影响评价工程师", "tax_accountant": "税务师",
    "physician": "医师资格",
}
# A few CMMLU subjects; others fall back to the key (a subject_mapping.json in the folder wins).
CMMLU_SUBJECTS_ZH = {
    "agronomy": "农学", "anatomy": "解剖学", "ancient_chinese": "古汉语", "arts": "艺术学",
    "astronomy": "天文学", "chinese_history": "中国历史", "chinese_literature": "中国文学",
    "college_mathematics": "大学数学", "computer_science": "计算机科学", "high_school_physics": "高中物理",
    "world_history": "世界历史", "nutrition": "营养学", "philosophy": "哲学", "virology": "病毒学",
}


@dataclass
class MCQItem:
    """One multiple-choice question; `answer` is the index of the correct choice."""

    question: str
    choices: list[str]
    answer: int
    subject: str = "all"
    source: str = ""  # "file:row" for error messages


@dataclass
class MCQSet:
    """Evaluation items and few-shot (dev) items, both grouped by subject."""

    eval: dict[str, list[MCQItem]] = field(default_factory=dict)
    dev: dict[str, list[MCQItem]] = field(default_factory=dict)
    subject_names: dict[str, str] = field(default_factory=dict)  # key -> display name in the prompt


def _answer_index(raw: object, n_choices: int, where: str) -> int:
    """Accept "B", " b ", 1 or "1" (index) and return the index; raise a clear error otherwise."""
    if isinstance(raw, bool) or raw is None or (isinstance(raw, str) and not raw.strip()):
        raise ValueError(f"{where}: answer is empty (test splits of C-Eval/CMMLU hide answers; use val/dev)")
    if isinstance(raw, int):
        idx = raw
    else:
        s = str(raw).strip().upper().rstrip(".")
        if len(s) == 1 and s in LETTERS:
            idx = LETTERS.index(s)
        elif s.isdigit():
            idx = int(s)
        else:
            raise ValueError(f"{where}: answer {raw!r} is not a letter {LETTERS[:n_choices]} or a choice index")
    if not 0 <= idx < n_choices:
        raise ValueError(f"{where}: answer {raw!r} is out of range for {n_choices} choices")
    return idx


def read_mcq_csv(path: Path, subject: str, header: bool | None = None) -> list[MCQItem]:
    """Read one subject CSV. header=None detects it (C-Eval/CMMLU have one, MMLU has none)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{path}: file is empty")
    first = [c.strip().lower() for c in rows[0]]
    if header is None:
        header = "question" in first and "answer" in first
    items: list[MCQItem] = []
    if header:
        for col in ("question", "answer"):
            if col not in first:
                raise ValueError(f"{path}: header {rows[0]} has no '{col}' column")
        q_col, a_col = first.index("question"), first.index("answer")
        letter_cols = [first.index(c.lower()) for c in LETTERS if c.lower() in first]
        if len(letter_cols) < 2:
            raise ValueError(f"{path}: header {rows[0]} needs option columns A, B, ...")
        body, row0 = rows[1:], 2
    else:
        q_col, letter_cols, a_col = 0, [1, 2, 3, 4], 5
        body, row0 = rows, 1
    need = max(q_col, a_col, *letter_cols) + 1
    for i, row in enumerate(body):
        where = f"{path}: row {i + row0}"
        if not any(c.strip() for c in row):
            continue
        if len(row) < need:
            raise ValueError(f"{where}: expected {need} columns (question, options, answer), got {len(row)}")
        question = row[q_col].strip()
        if not question:
            raise ValueError(f"{where}: question is empty")
        choices = [row[c].strip() for c in letter_cols]
        items.append(MCQItem(question, choices, _answer_index(row[a_col], len(choices), where), subject, where))
    return items


def read_mcq_jsonl(path: Path, default_subject: str) -> list[MCQItem]:
    """Read generic / MMLU-style JSON lines (or a .json list) with question, choices, answer."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            records = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None
    else:
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n}: invalid JSON ({e.msg})") from None
    items = []
    for n, rec in records:
        where = f"{path}: line {n}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected an object with question/choices/answer")
        for key in ("question", "choices", "answer"):
            if key not in rec:
                raise ValueError(f"{where}: missing field '{key}' (have {sorted(rec)})")
        choices = rec["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or len(choices) > len(LETTERS):
            raise ValueError(f"{where}: 'choices' must be a list of 2..26 strings")
        if not str(rec["question"]).strip():
            raise ValueError(f"{where}: question is empty")
        subject = str(rec.get("subject") or default_subject)
        idx = _answer_index(rec["answer"], len(choices), where)
        items.append(MCQItem(str(rec["question"]).strip(), [str(c) for c in choices], idx, subject, where))
    if not items:
        raise ValueError(f"{path}: no questions found")
    return items


def _split_and_subject(path: Path) -> tuple[str | None, str]:
    """`computer_network_val.csv` -> ("val", "computer_network"); `test/agronomy.csv` -> ("test", "agronomy")."""
    stem = path.stem
    if stem.lower() in SPLITS:  # e.g. mmlu/test.jsonl
        return stem.lower(), "all"
    for split in SPLITS:
        if stem.endswith("_" + split):
            return split, stem[: -len(split) - 1]
    parent = path.parent.name.lower()
    return (parent if parent in SPLITS else None), stem


def load_mcq(task: str, data: str | Path | None = None, split: str | None = None) -> MCQSet:
    """Load a multiple-choice benchmark from a file or a folder in one of the official layouts.

    Files whose split is neither the evaluated split nor "dev" are ignored. A single file is the
    evaluated split; its few-shot examples come from a matching `*_dev.csv` / `dev/` sibling if present.
    """
    path = Path(data) if data is not None else BUNDLED[task]
    if not path.exists():
        raise FileNotFoundError(f"{path}: benchmark file or folder not found")
    split = split or DEFAULT_SPLIT.get(task, "test")
    header = True if task in ("ceval", "cmmlu") else None  # MMLU: no header (detected if one is there)
    out = MCQSet()

    if path.is_file():
        files = [path]
        s, subject = _split_and_subject(path)
        for cand in (path.with_name(f"{subject}_dev.csv"), path.parent.parent / "dev" / f"{subject}_dev.csv",
                     path.parent.parent / "dev" / f"{subject}.csv"):
            if cand.exists() and cand != path:
                files.append(cand)
                break
        roles = {path: "eval"} | {f: "dev" for f in files[1:]}
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix in (".csv", ".jsonl", ".json")
                       and p.name != "subject_mapping.json")
        if not files:
            raise FileNotFoundError(f"{path}: no .csv/.jsonl benchmark files inside")
        roles = {}
        for f in files:
            s, _ = _split_and_subject(f)
            s = "val" if s == "validation" else s
            if s == split or (s is None and f.suffix != ".csv"):
                roles[f] = "eval"
            elif s == "dev":
                roles[f] = "dev"
        if "eval" not in roles.values():
            found = sorted({str(_split_and_subject(f)[0]) for f in files})
            raise FileNotFoundError(f"{path}: no files for split '{split}' (found splits: {found}); use --split")

    for f, role in roles.items():
        _, subject = _split_and_subject(f)
        if f.suffix == ".csv":
            items = read_mcq_csv(f, subject, header)
        else:
            items = read_mcq_jsonl(f, "all" if subject in SPLITS or subject == "mcq" else subject)
        target = out.eval if role == "eval" else out.dev
        for it in items:
            target.setdefault(it.subject, []).append(it)

    names = CEVAL_SUBJECTS_ZH if task == "ceval" else CMMLU_SUBJECTS_ZH if task == "cmmlu" else {}
    mapping_file = (path if path.is_dir() else path.parent) / "subject_mapping.json"
    extra = json.loads(mapping_file.read_text(encoding="utf-8")) if mapping_file.exists() else {}
    for s in out.eval:
        v = extra.get(s)
        if isinstance(v, list):  # C-Eval's mapping: [english, chinese, category]
            v = v[1] if task in ("ceval", "cmmlu") and len(v) > 1 else v[0]
        out.subject_names[s] = v or names.get(s) or s.replace("_", " ")
    return out


# ---------------------------------------------------------------------------------------------
# Prompts. Zero-shot = header + question; k-shot = header + k solved dev questions + question.

def _lang(task: str) -> str:
    return "zh" if task in ("ceval", "cmmlu") else "en"


def prompt_header(task: str, subject_name: str) -> str:
    if task == "ceval":
        return f"以下是中国关于{subject_name}考试的单项选择题，请选出其中的正确答案。\n\n"
    if task == "cmmlu":
        return f"以下是关于{subject_name}的单项选择题，请直接给出正确答案的选项。\n\n"
    if subject_name == "all":
        return "The following are multiple choice questions (with answers).\n\n"
    return f"The following are multiple choice questions (with answers) about {subject_name}.\n\n"


def answer_cue(task: str) -> str:
    """Text right before the answer; the letter (or option text) is the continuation."""
    return "答案：" if _lang(task) == "zh" else "Answer:"


def answer_sep(task: str) -> str:
    """Separator between the cue and the answer: "Answer: A" in English, "答案：A" in Chinese."""
    return "" if _lang(task) == "zh" else " "


def format_question(task: str, item: MCQItem, with_choices: bool = True) -> str:
    q = item.question
    if task == "cmmlu":
        q = "题目：" + q
    if with_choices:
        q += "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
    return q + "\n" + answer_cue(task)


def build_prompt(task: str, subject_name: str, item: MCQItem, shots: list[MCQItem], scoring: str) -> str:
    """letter scoring lists the options and expects a letter; option scoring is the cloze form
    (question only, the option text is the continuation; OLMES, Gu et al. 2024)."""
    with_choices = scoring == "letter"
    parts = [prompt_header(task, subject_name)]
    for ex in shots:
        ans = LETTERS[ex.answer] if with_choices else ex.choices[ex.answer]
        parts.append(format_question(task, ex, with_choices) + answer_sep(task) + ans + "\n\n")
    parts.append(format_question(task, item, with_choices))
    return "".join(parts)


def pick_shots(data: MCQSet, item: MCQItem, k: int) -> list[MCQItem]:
    """First k dev questions of the subject (the official protocol); without a dev split, the first k
    other questions of the same subject."""
    if k <= 0:
        return []
    pool = data.dev.get(item.subject) or [x for x in data.eval.get(item.subject, []) if x is not item]
    return pool[:k]


# ---------------------------------------------------------------------------------------------
# Generation and language-modelling data.

@dataclass
class GenItem:
    question: str
    answer: str  # the extracted final answer (text after "####" in GSM8K)
    solution: str = ""  # the full reference answer, shown in few-shot examples
    source: str = ""


def load_gen(data: str | Path | None = None) -> list[GenItem]:
    """GSM8K-style JSONL: {"question", "answer"}; the gold answer is the text after "####" if present."""
    path = Path(data) if data is not None else BUNDLED["gen"]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: generation task file not found (JSONL with question/answer)")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
        q = rec.get("question", rec.get("prompt")) if isinstance(rec, dict) else None
        a = rec.get("answer", rec.get("solution")) if isinstance(rec, dict) else None
        if not q or a is None:
            raise ValueError(f"{where}: need fields 'question' and 'answer'")
        a = str(a)
        gold = a.split("####")[-1] if "####" in a else a
        items.append(GenItem(str(q), gold.strip().replace(",", ""), a.strip(), where))
    if not items:
        raise ValueError(f"{path}: no questions found")
    return items


def load_texts(data: str | Path | None = None) -> list[str]:
    """Documents for perplexity: a .txt file (one document) or JSONL with a "text" field per line."""
    path = Path(data) if data is not None else BUNDLED["ppl"]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: text file not found")
    if path.suffix in (".jsonl", ".json"):
        docs = []
        lines = path.read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise ValueError(f"{path}: line {n}: need a string field 'text'")
            docs.append(rec["text"])
    else:
        docs = [path.read_text(encoding="utf-8")]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"{path}: no text found")
    return docs
