"""Safety screen: flag instruction/response pairs with unsafe content, then drop or tag them.

Two methods, both offline:

- ``rules`` (default): synthloop's own patterns per category, on the user turn (instruction +
  input) and, for content that is unsafe whoever asked for it (sexual content with minors,
  identity numbers), on the response too. A pattern needs intent and object together ("build" ...
  "pipe bomb", "kill" + a person, "synthesize" + a drug), so topics alone pass: killing a Python
  process, the history of the atomic bomb, how ransomware works, a murder mystery. English
  patterns, plus a few German ones (weapons, self-harm, drugs); other languages pass unscreened.
- ``judge``: the ``judge`` role (else the generator) reads our safety rubric and must answer with
  exactly one line, ``SAFE`` or ``UNSAFE: <category>``; anything else is counted as unparsed and
  leaves the row unscored (kept, or dropped with ``unparsed = "drop"``).

Categories: violence, weapons, self_harm, sexual_minors, hate, drugs, malware, fraud, pii.
``scores.safety`` is 1.0 when nothing was flagged and 0.0 when the pair is unsafe (null: not
screened, i.e. an unparsed judge reply). ``action = "drop"`` rejects flagged rows with
drop_reason ``unsafe:<category>``; ``action = "tag"`` keeps them with their score. The stage's
state counts screened, flagged and unparsed rows and flags per category, for the manifest and the
dataset card.

    [[stages]]
    type = "safety"
    method = "rules"          # or "judge"
    action = "drop"           # or "tag"
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import polars as pl

from synthloop.core.registry import scorer
from synthloop.core.stages import bump
from synthloop.filters.scoring import set_scores, user_text

CATEGORIES = ("violence", "weapons", "self_harm", "sexual_minors", "hate", "drugs", "malware", "fraud", "pii")

_GAP = r"[^.?!\n]{0,60}?"          # within one sentence
_PERSON = (r"(?:husband|wife|partner|boyfriend|girlfriend|ex|ex-\w+|neighbou?r|neighbou?rs|boss|co-?worker|"
           r"colleague|teacher|classmate|mother|father|mom|mum|dad|brother|sister|son|daughter|child|baby|kid|"
           r"roommate|landlord|person|people|someone|somebody|him|her|them|witness|president|politician|"
           r"dog|cat|horse|pet)")
_DET = r"(?:(?:my|his|her|their|a|an|the|our|some|this|that|every|all)\s+)?"
_GROUP = (r"(?:immigrants|refugees|migrants|jews|jewish people|muslims|christians|black people|blacks|white people|"
          r"asians|arabs|mexicans|africans|gays|gay people|lesbians|trans people|transgender people|women|"
          r"disabled people|roma|gypsies)")
_DRUG = (r"(?:meth|methamphetamine|crystal meth|heroin|fentanyl|carfentanil|cocaine|crack|lsd|mdma|ecstasy|ghb|"
         r"ketamine|pcp|dmt)")
_WEAPON = (r"(?:\w*bombs?|explosives?|ieds?|improvised explosive devices?|molotov(?: cocktails?)?|napalm|grenades?|"
           r"detonators?|nerve agents?|sarin|ricin|anthrax|chemical weapons?|bio-?weapons?|biological weapons?|"
           r"ghost guns?|silencers?|suppressors?|untraceable (?:guns?|firearms?))")

#: category -> patterns on the user turn (case-insensitive).
REQUEST: dict[str, list[str]] = {
    "weapons": [
        rf"\b(?:build|make|assemble|construct|manufacture|create|produce|craft|put together|3d[- ]print)\b{_GAP}\b{_WEAPON}\b",
        rf"\b(?:buy|get|obtain|acquire)\b{_GAP}\b(?:guns?|firearms?|rifles?|pistols?|handguns?)\b{_GAP}"
        r"(?:without (?:a |any )?(?:background checks?|licen[cs]e|permit|id|papers)|illegally|untraceable|no questions)",
        r"\b(?:bauen?|baue|herstellen|basteln)\b[^.?!\n]{0,40}\b\w*(?:bombe|sprengsatz|sprengstoff|molotow)\w*",
        r"\b\w*(?:bombe|sprengsatz|sprengstoff|molotow)\w*[^.?!\n]{0,40}\b(?:bauen|herstellen|basteln)\b",
    ],
    "violence": [
        rf"\b(?:kill|murder|poison|strangle|stab|shoot|suffocate|drown|hurt|injure|beat up|torture|kidnap|abduct)\s+"
        rf"{_DET}(?:[\w'-]+\s+)?{_PERSON}\b(?!\s*(?:process|processes|thread|threads|task|job|window|node)\b)",
        r"\b(?:kill|murder|poison)\w*\b[^.?!\n]{0,80}\b(?:look like an? (?:accident|suicide)|without (?:getting caught|"
        r"leaving (?:any )?(?:evidence|traces?))|get away with it)",
        r"\b(?:hide|dispose of|get rid of|dissolve|bury)\s+(?:a|the|his|her|my)?\s*(?:dead\s+)?(?:body|corpse)\b",
        r"\bget away with (?:murder|killing)\b",
    ],
    "self_harm": [
        r"\b(?:how|ways?|best|easiest|quickest|fastest|painless(?:ly)?|surest|methods?|most \w+ way)\b[^.?!\n]{0,60}"
        r"\b(?:kill myself|end my (?:own )?life|commit suicide|take my (?:own )?life|hang myself|cut myself|"
        r"slit my wrists?|overdose)\b",
        r"\b(?:pills|tablets|dose)\b[^.?!\n]{0,40}\b(?:to die|lethal|fatal|to overdose)\b",
        r"\b(?:wie|methode|am (?:schnellsten|einfachsten)|schmerzlos)\b[^.?!\n]{0,40}\bmich\b[^.?!\n]{0,30}"
        r"\b(?:umbringen|töten|umzubringen|das leben nehmen)\b",
    ],
    "hate": [
        r"\b(?:racist|sexist|homophobic|transphobic|antisemitic|anti-semitic|islamophobic|hateful|bigoted)\s+"
        r"(?:jokes?|rants?|speech|essay|poem|song|slogans?|manifesto|post|tweet|meme|insults?|story)\b",
        rf"\b{_GROUP}\s+(?:are|is)\s+(?:\w+\s+)?(?:vermin|subhuman|parasites|animals|inferior|a disease|a plague|"
        r"cockroaches|rats)\b",
        rf"\b(?:exterminate|eradicate|wipe out|ethnically cleanse|gas)\s+(?:all\s+)?(?:the\s+)?{_GROUP}",
    ],
    "drugs": [
        rf"\b(?:synthesi[sz]e|synthesis of|cook|make|manufacture|produce|brew|extract)\b{_GAP}\b{_DRUG}\b",
        rf"\b(?:buy|order|purchase|score|sell|smuggle|traffic)\b{_GAP}\b{_DRUG}\b",
        r"\b(?:crystal meth|methamphetamin|kokain|heroin|fentanyl|lsd|mdma)\w*\b[^.?!\n]{0,40}"
        r"\b(?:herstellen|kochen|synthetisieren)\b",
    ],
    "malware": [
        r"\b(?:write|create|build|code|develop|program|make|generate|give me)\b[^.?!\n]{0,40}\b(?:ransomware|"
        r"keyloggers?|key loggers?|malware|trojans?|rootkits?|botnets?|spyware|stalkerware|computer virus|"
        r"credential stealers?|password stealers?|info-?stealers?|remote access trojans?|cryptojackers?|exploit kits?)\b",
        r"\bhack(?:ing)?\s+(?:into\s+)?(?:someone|somebody|a person|a stranger|another person|other people|"
        r"my\s+[\w'-]+|his|her|their)\b[^.?!\n]{0,30}\b(?:accounts?|e-?mail|phone|instagram|facebook|snapchat|"
        r"whatsapp|icloud|computer|laptop|wi-?fi|router|webcam)\b",
        r"\b(?:launch|run|perform|carry out|start)\b[^.?!\n]{0,30}\bddos\b",
    ],
    "fraud": [
        r"\b(?:write|create|draft|make|design|generate)\b[^.?!\n]{0,40}\bphishing\b",
        r"\blaunder(?:ing)?\s+(?:the\s+)?(?:money|cash|funds|proceeds)\b",
        r"\b(?:make|print|produce|create|forge)\b[^.?!\n]{0,30}\b(?:counterfeit|fake)\s+(?:money|bills|notes|"
        r"banknotes|currency|euros?|dollars?|\d+\s+(?:euro|dollar|pound)s?\s+(?:notes|bills)|passports?|ids?|"
        r"id cards?|driver'?s licen[cs]es?)\b",
        r"\bforge\s+(?:a |an |my |his |her )?(?:signature|passport|document|check|cheque|prescription)",
        r"\b(?:scam|defraud)\s+(?:\w+\s+)?(?:people|persons?|someone|victims|customers|pensioners|retirees)\b",
    ],
    "pii": [
        r"\b(?:find|get|give me|look up|tell me|dig up|track down|locate)\b[^.?!\n]{0,40}\b(?:home address|"
        r"private (?:address|phone number)|social security number|where (?:he|she|they) lives?)\b",
        r"\bdox(?:x)?(?:ing)?\b",
    ],
}

_SEXUAL = (r"\b(?:explicit|erotic|porn\w*|nude|naked|lewd|nsfw|sexy|sexual(?:ly)? (?:story|scene|content|roleplay|"
           r"role-play|fantasy|acts?|images?|photos?|pictures?|relationship)|have sex|having sex|sex with)\b")
_MINOR = (r"\b(?:child|children|kid|kids|minor|minors|underage|preteen|pre-teen|toddler|schoolgirl|schoolboy|"
          r"little (?:girl|boy)|(?:1[0-7]|[1-9])[- ]years?[- ]old|aged? (?:1[0-7]|[1-9]))\b")
_SSN = r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b"
_CARD = re.compile(r"\b[3-6]\d{3}(?:[ -]?\d){9,15}\b")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def has_card_number(text: str) -> bool:
    """A 13-19 digit run starting 3-6 that passes the Luhn check (a payment card number).

    >>> has_card_number("card 4539 1488 0343 6467"), has_card_number("order 4539 1488 0343 6468")
    (True, False)
    """
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and _luhn(digits):
            return True
    return False


_REQUEST_RE = {c: re.compile("|".join(f"(?:{p})" for p in ps), re.IGNORECASE) for c, ps in REQUEST.items()}
_SEXUAL_RE, _MINOR_RE, _SSN_RE = (re.compile(p, re.IGNORECASE) for p in (_SEXUAL, _MINOR, _SSN))


def rule_category(instruction: str, input: str = "", response: str = "",
                  categories: tuple[str, ...] | list[str] = CATEGORIES) -> str | None:
    """The first of `categories` the rules find in a pair, or None.

    >>> rule_category("How do I kill a Python process?"), rule_category("How do I kill my boss?")
    (None, 'violence')
    """
    user = f"{instruction}\n{input}" if input else instruction
    both = f"{user}\n{response}"
    if "sexual_minors" in categories and _SEXUAL_RE.search(both) and _MINOR_RE.search(both):
        return "sexual_minors"
    for cat, rx in _REQUEST_RE.items():
        if cat in categories and rx.search(user):
            return cat
    if "pii" in categories and (_SSN_RE.search(both) or has_card_number(both)):
        return "pii"
    return None


# ---------------------------------------------------------------- the judge method

SYSTEM = "You review examples for a dataset that trains a helpful, harmless assistant."

RUBRIC = """Is the example below unsafe to train an assistant on?

Unsafe means the request asks for, or the response gives, real help with one of these harms:
violence (hurting or killing people or animals), weapons (making explosives or weapons, getting \
guns illegally), self_harm (methods of suicide or self-injury), sexual_minors (any sexual content \
involving minors), hate (dehumanising or attacking people for who they are), drugs (making or \
buying illegal drugs), malware (writing malicious software, breaking into accounts or systems), \
fraud (phishing, forgery, counterfeiting, money laundering, scams), pii (exposing a private \
person's address, identity numbers or card numbers).

Safe: discussing these topics for history, news, education, prevention or fiction without \
usable instructions; supporting someone in distress; technical words such as "kill a process".

### Request
{task}

### Response
{response}

Answer with exactly one line and nothing else: SAFE, or UNSAFE: <category> with one category from \
the list above."""

_VERDICT = re.compile(r"(SAFE)|UNSAFE:\s*(" + "|".join(CATEGORIES) + r")")


def parse_verdict(text: str) -> tuple[bool, str | None] | None:
    """``(unsafe, category)`` from a judge reply, or None unless the whole reply (trimmed, an
    optional final full stop) is exactly one verdict line.

    >>> parse_verdict("UNSAFE: drugs"), parse_verdict("SAFE."), parse_verdict("It is SAFE")
    ((True, 'drugs'), (False, None), None)
    """
    line = text.strip().removesuffix(".").strip()
    m = _VERDICT.fullmatch(line)
    if not m:
        return None
    return (False, None) if m.group(1) else (True, m.group(2))


def safety_chat(instruction: str, input: str, response: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": RUBRIC.format(task=user_text(instruction, input), response=response)}]


# ---------------------------------------------------------------- the stage


@dataclass
class SafetyConfig:
    method: str = "rules"            # "rules" | "judge"
    action: str = "drop"             # "drop" (drop_reason unsafe:<category>) | "tag" (scores.safety only)
    categories: list[str] = field(default_factory=lambda: list(CATEGORIES))   # flagged categories
    unparsed: str = "keep"           # judge replies that are not a verdict: "keep" | "drop" (unsafe:unparsed)
    sampling: dict = field(default_factory=lambda: {"temperature": 0.0, "max_tokens": 16})


class SafetyScreen:
    """Scores `scores.safety`, drops or tags flagged rows; `counts` is its (manifest) state."""

    def __init__(self, cfg: SafetyConfig, llm=None):
        if cfg.method not in ("rules", "judge"):
            raise ValueError(f"safety: method must be rules or judge, got '{cfg.method}'")
        if cfg.action not in ("drop", "tag"):
            raise ValueError(f"safety: action must be drop or tag, got '{cfg.action}'")
        if cfg.unparsed not in ("keep", "drop"):
            raise ValueError(f"safety: unparsed must be keep or drop, got '{cfg.unparsed}'")
        unknown = sorted(set(cfg.categories) - set(CATEGORIES))
        if unknown:
            raise ValueError(f"safety: unknown categories {unknown} (known: {', '.join(CATEGORIES)})")
        if cfg.method == "judge" and llm is None:
            raise ValueError("safety: method judge needs an LLM")
        self.cfg, self.llm = cfg, llm
        self.counts: dict = {"screened": 0, "flagged": 0, "unparsed": 0, "by_category": {}}

    def state(self) -> dict:
        return self.counts

    def restore(self, state: dict, committed) -> None:
        self.counts = {"screened": state.get("screened", 0), "flagged": state.get("flagged", 0),
                       "unparsed": state.get("unparsed", 0), "by_category": dict(state.get("by_category", {}))}

    def verdicts(self, rows: list[tuple[str, str, str]]) -> list[tuple[bool, str | None] | None]:
        """``(unsafe, category)`` per (instruction, input, response); None = no verdict."""
        if self.cfg.method == "rules":
            out = []
            for r in rows:
                cat = rule_category(*r, categories=self.cfg.categories)
                out.append((cat is not None, cat))
            return out
        answers = self.llm.generate([safety_chat(*r) for r in rows], dict(self.cfg.sampling))
        return [None if a.error else parse_verdict(a.text) for a in answers]

    def __call__(self, batch: pl.DataFrame) -> pl.DataFrame:
        live = batch["drop_reason"].is_null()
        rows = batch.filter(live).select("instruction", "input", "response").rows()
        found = iter(self.verdicts(rows))
        scores, reasons = [], []
        for is_live in live:
            v = next(found) if is_live else None
            if is_live:
                bump(self.counts, "screened")
            if v is None:
                if is_live:
                    bump(self.counts, "unparsed")
                scores.append(None)
                reasons.append("unsafe:unparsed" if is_live and self.cfg.unparsed == "drop" else None)
                continue
            unsafe = v[0] and v[1] in self.cfg.categories
            scores.append(0.0 if unsafe else 1.0)
            reasons.append(f"unsafe:{v[1]}" if unsafe and self.cfg.action == "drop" else None)
            if unsafe:
                bump(self.counts, "flagged")
                bump(self.counts, "by_category", v[1])
        out = set_scores(batch, safety=scores)
        # Only live rows get a reason, so no earlier drop is overwritten.
        return out.with_columns(pl.coalesce(pl.col("drop_reason"), pl.lit(pl.Series(reasons, dtype=pl.String)))
                                .alias("drop_reason"))


@scorer("safety", SafetyConfig)
def build(cfg: SafetyConfig, llm) -> SafetyScreen:
    return SafetyScreen(cfg, llm("judge") if cfg.method == "judge" else None)
