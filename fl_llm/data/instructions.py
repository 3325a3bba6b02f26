"""Shop-assistant conversations in the synthetic world: skills every platform shares, and its own policies.

Each platform (a company of `synthetic.make_world`) sells from the shared catalog with its own
category mix, and has its own policies — return windows (one for electronics, one for the rest), a
free-shipping threshold and fee, a warranty, a greeting in its own tone. Its assistant's
conversations open with a system message naming the platform and ask, in English or Chinese (each
platform its own mix):

- `attribute` (shared): a product card, then "what is its brand / colour / category?" —
  sometimes a follow-up question in a second turn;
- `title` (shared): a title (brand, colour, category) written from attributes listed in random
  order;
- `qa` (shared): "does it come in <colour>?" answered from the card;
- `policy` (the platform's own): returns, shipping, warranty — answered with the platform's
  greeting and its numbers.

Every answer is a deterministic function of the conversation, so exact match is meaningful, and
every one is learnable from a young shop's data by the built-in model. Earlier choices were not,
and were changed. The shipping question named an order's amount and asked whether it ships
free: comparing two prices is not learnable from a few dozen examples (shop models gave one verdict
to nearly every amount, right on 20 of 38 held-out orders where always "free" is right on 29), so
it asks for the rule. A return question asked about the product on the card, so a shop that sells
mostly electronics (or hardly any) showed its other return window in 0 to 3 of its 60
conversations, and its held-out answers to that window measured luck: it asks about any product.
Named only by its category, that product's window asked which goods are electronics — a fact of the
catalog, not a shop's policy, and shown in Chinese two or three times per young shop: where it was
read, the federated and the personalised model each gave one window (not the same) to nearly every
Chinese return question, so the shop's score on its own policies measured which window a model
happened to pick. Given as a category path, department first ("electronics > phones", "百货 > 咖啡"),
as a product page does, the answer still asked to read the department off a path whose category the
shop's data had mostly never shown in that language (57% of held-out return questions over six
seeds): the federated and personalised models answered the categories their training asked and
gave the other window to the rest — a shared skill, reading a path, scored as the shop's policy.
So a return question names the department alone ("How many days do I have to return
electronics?", "电子产品可以在几天内退货？"), as a shopper asks a shop's FAQ, and the warranty question,
one warranty for every product, names none ("How long is the warranty?", "保修多久？"): asked about a
category ("What warranty comes with the sneakers?"), a category the shop's warranty questions never
named in that language drew another shop's number into the answer. Reading a product card is scored
where it belongs, in the shared skills. And drawn independently, a young shop's 60
conversations held 10 to 23 policy questions, and most shops never saw some policy asked in some
language — held-out questions its own data could not teach. So each split has the skills in
SKILL_MIX's exact proportions, and its policy conversations ask the four policy facts (both return
windows, shipping, warranty) in both languages in turn, each block of eight in its own random order
(a shop's policies are stated in both languages; its other conversations follow its language mix).
A federated model can learn the shared skills from everyone's data, while each platform's policy
answers are its own (the system message says whose). A value the answer copies from the prompt is
written after a space in both, as in the card: a byte-level tokenizer gives " Orbit" and "Orbit"
different tokens, and copying should not need a spelling lesson. Records carry `skill`, `scope`
(shared or own), `lang` and, for policy questions, `fact` (POLICY_FACTS); metrics are reported per
skill, scope, language and policy fact in each language. As in `synthetic`, a platform only ever
draws its own records.
"""

from __future__ import annotations

import numpy as np

from fl_llm.data.synthetic import CATEGORIES, World, _sample_items

COLORS = ("red", "blue", "black", "white", "green", "pink", "grey", "yellow")
COLORS_ZH = ("红色", "蓝色", "黑色", "白色", "绿色", "粉色", "灰色", "黄色")
CATEGORIES_ZH = (
    "运动鞋",
    "连衣裙",
    "手机",
    "笔记本电脑",
    "耳机",
    "护肤品",
    "零食",
    "咖啡",
    "玩具",
    "图书",
    "家具",
    "户外用品",
)
# A return question names the department alone (English, Chinese): see the module's note.
DEPARTMENTS = {True: ("electronics", "电子产品"), False: ("general goods", "百货")}
GREETINGS = (
    ("Hi lovely!", "亲爱的，"),
    ("Hello, tech fan.", "科技达人您好，"),
    ("Dear customer,", "尊敬的顾客，"),
    ("Hey champ!", "冠军你好！"),
    ("Hello, reader.", "读者您好，"),
    ("Hi there, parent!", "家长您好，"),
)
ZH_SHARE = (0.25, 0.5, 0.35, 0.6, 0.3, 0.45)  # Chinese conversations on each platform archetype
SKILLS = ("attribute", "title", "qa", "policy")
SKILL_MIX = (0.25, 0.25, 0.2, 0.3)
POLICY_FACTS = ("return_electronics", "return_other", "shipping", "warranty")


def item_color(world: World, items: np.ndarray) -> np.ndarray:
    """Each catalog item's colour, fixed by the world's seed."""
    rng = np.random.default_rng([world.seed, 0xC010])
    return rng.integers(0, len(COLORS), size=world.item_category.size)[items]


def policies(world: World, platform: int) -> dict:
    """A platform's own policies: distinct numbers on each of the first platforms."""
    rng = np.random.default_rng([world.seed, 0xB011])
    pick = {
        "return_days": rng.permutation([30, 7, 60, 14, 90, 45]),
        "return_days_electronics": rng.permutation([15, 10, 7, 30, 20, 5]),
        "free_over": rng.permutation([25, 49, 35, 99, 59, 75]),
        "fee": rng.permutation([5, 8, 4, 6, 9, 3]),
        "warranty_months": rng.permutation([12, 24, 6, 36, 18, 3]),
    }
    out = {k: int(v[platform % len(v)]) for k, v in pick.items()}
    out["greeting"], out["greeting_zh"] = GREETINGS[platform % len(GREETINGS)]
    return out


def _card(fields: dict, zh: bool) -> str:
    if zh:
        return (
            f"商品卡片：品牌 {fields['brand']}；类别 {fields['category_zh']}；颜色 {fields['color_zh']}；"
            f"价格 {fields['price']}美元；评分 {fields['rating']}。"
        )
    return (
        f"Product card: brand {fields['brand']}; category {fields['category']}; color {fields['color']}; "
        f"price ${fields['price']}; rating {fields['rating']}."
    )


_ATTR_EN = {"brand": "brand", "color": "color", "category": "category"}
_ATTR_ZH = {"brand": "品牌", "color": "颜色", "category": "类别"}


def _value(fields: dict, attr: str, zh: bool) -> str:
    return str(fields[f"{attr}_zh"] if zh and attr != "brand" else fields[attr])


def _attribute(fields, zh, rng) -> list[dict]:
    attrs = rng.permutation(list(_ATTR_EN))
    turns = 2 if rng.random() < 0.3 else 1
    msgs = []
    for t in range(turns):
        attr = str(attrs[t])
        value = _value(fields, attr, zh)
        if zh:
            q = f"{_card(fields, zh)}\n这件商品的{_ATTR_ZH[attr]}是什么？" if t == 0 else f"那{_ATTR_ZH[attr]}呢？"
            a = f"{_ATTR_ZH[attr]}是 {value}。"
        else:
            q = f"{_card(fields, zh)}\nWhat is the {attr} of this product?" if t == 0 else f"And the {attr}?"
            a = f"The {attr} is {value}."
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs


def _title(fields, zh, rng) -> list[dict]:
    order = rng.permutation(["brand", "category", "color"])
    if zh:
        listed = "；".join(f"{_ATTR_ZH[k]} {_value(fields, k, zh)}" for k in order)
        q = f"根据这些属性写一个商品标题：{listed}"
        a = f"标题 {fields['brand']} {fields['color_zh']} {fields['category_zh']}"
    else:
        listed = "; ".join(f"{k} {fields[k]}" for k in order)
        q = f"Write a product title from these attributes: {listed}"
        a = f"Title: {fields['brand']} {fields['color']} {fields['category']}"
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def _qa(fields, zh, rng) -> list[dict]:
    same = rng.random() < 0.5
    asked = fields["color_index"] if same else int((fields["color_index"] + rng.integers(1, len(COLORS))) % len(COLORS))
    if zh:
        q = f"{_card(fields, zh)}\n有{COLORS_ZH[asked]}的吗？"
        a = f"有，这款是 {fields['color_zh']}。" if same else f"没有，这款是 {fields['color_zh']}。"
    else:
        q = f"{_card(fields, zh)}\nDoes it come in {COLORS[asked]}?"
        a = f"Yes, it comes in {fields['color']}." if same else f"No, it comes in {fields['color']}."
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def _policy(zh: bool, pol: dict, fact: str) -> list[dict]:
    hi = pol["greeting_zh"] if zh else pol["greeting"]
    if fact.startswith("return"):  # the department alone: see the module's note on learnability
        electronic = fact == "return_electronics"
        department = DEPARTMENTS[electronic][zh]
        days = pol["return_days_electronics"] if electronic else pol["return_days"]
        qa = (
            (f"{department}可以在几天内退货？", f"{hi}可以在{days}天内退货。")
            if zh
            else (f"How many days do I have to return {department}?", f"{hi} You can return it within {days} days.")
        )
    elif fact == "shipping":  # the rule, not a verdict on an amount: see the module's note on learnability
        over, fee = pol["free_over"], pol["fee"]
        qa = (
            ("运费怎么算？", f"{hi}满{over}美元包邮，不满{over}美元运费{fee}美元。")
            if zh
            else ("How much is shipping?", f"{hi} Orders from ${over} ship free; below that, shipping is ${fee}.")
        )
    else:  # one warranty for every product, so the question names none: see the module's note
        months = pol["warranty_months"]
        qa = (
            ("保修多久？", f"{hi}保修{months}个月。")
            if zh
            else ("How long is the warranty?", f"{hi} It comes with {months} months of warranty.")
        )
    return [{"role": "user", "content": qa[0]}, {"role": "assistant", "content": qa[1]}]


def skill_plan(n: int, rng: np.random.Generator) -> np.ndarray:
    """The skill of each of `n` conversations: SKILL_MIX's exact proportions (largest remainder), shuffled."""
    raw = np.asarray(SKILL_MIX) * n
    counts = np.floor(raw).astype(int)
    counts[np.argsort(counts - raw, kind="stable")[: n - counts.sum()]] += 1
    return rng.permutation(np.repeat(np.arange(len(SKILLS)), counts))


def policy_plan(k: int, rng: np.random.Generator) -> list[tuple[str, bool]]:
    """The (fact, in Chinese) of each of `k` policy conversations: every fact in both languages once per
    block of eight, each block in its own random order — so a shop's data states all its policies."""
    combos = [(fact, zh) for fact in POLICY_FACTS for zh in (False, True)]
    return [combos[i] for _ in range(-(-k // len(combos))) for i in rng.permutation(len(combos))][:k]


def instruction_records(world: World, platform: int, n: int, *, split: str) -> list[dict]:
    """`n` conversations of one platform's shop assistant (train and eval: different draws)."""
    rng = np.random.default_rng([world.seed, 0x5EC, platform, {"train": 1, "eval": 2}[split], 5])
    pol = policies(world, platform)
    name = world.platform_names[platform]
    items = _sample_items(world, platform, (n,), rng)
    colors = item_color(world, items)
    skills = skill_plan(n, rng)
    asked = iter(policy_plan(int((skills == SKILLS.index("policy")).sum()), rng))
    zh_share = ZH_SHARE[platform % len(ZH_SHARE)]
    rows = []
    for item, color, skill in zip(items, colors, skills):
        c = int(world.item_category[item])
        fields = {
            "brand": CATEGORIES[c][1][world.item_brand[item]],
            "category": CATEGORIES[c][0],
            "category_zh": CATEGORIES_ZH[c],
            "color": COLORS[color],
            "color_zh": COLORS_ZH[color],
            "color_index": int(color),
            "price": int(round(float(world.item_price[item]))),
            "rating": f"{world.item_rating[item]:.1f}",
        }
        kind = SKILLS[skill]
        if kind == "policy":
            fact, zh = next(asked)
            turns = _policy(zh, pol, fact)
        else:
            zh = bool(rng.random() < zh_share)
            turns = {"attribute": _attribute, "title": _title, "qa": _qa}[kind](fields, zh, rng)
        system = f"你是{name}的购物助手。" if zh else f"You are the shopping assistant of {name}."
        row = {
            "messages": [{"role": "system", "content": system}, *turns],
            "skill": kind,
            "scope": "own" if kind == "policy" else "shared",
            "lang": "zh" if zh else "en",
        }
        if kind == "policy":
            row["fact"] = fact
        rows.append(row)
    return rows
