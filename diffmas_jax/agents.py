"""Agent roles and the prompts they see, in plain words that suit any chat template.

An agent is a role plus its number of latent steps. Layouts are just default
agent lists; users can pass their own list (any number, any roles).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

ROLE_BRIEFS = {
    "planner": ("You are the Planner in a team of agents that solve a question together. "
                "Think through the question and lay out a clear, step-by-step plan for solving it. "
                "Do not state a final answer."),
    "critic": ("You are the Critic in a team of agents. Earlier teammates have already reasoned about "
               "the question. Check that reasoning: point out mistakes, missing cases and weak steps."),
    "refiner": ("You are the Refiner in a team of agents. Using your teammates' plan and critique, "
                "produce a corrected and complete line of reasoning for the question."),
    "math": ("You are the mathematics specialist of a team. Analyse the question from a mathematical "
             "point of view: quantities, equations and calculations."),
    "science": ("You are the science specialist of a team. Analyse the question using relevant "
                "scientific facts and principles."),
    "code": ("You are the programming specialist of a team. Analyse the question as a programmer would: "
             "algorithms, edge cases and how to check the result."),
    "solver": ("You are the Solver, the last member of a team of agents. Use the team's earlier reasoning "
               "where it helps, solve the question yourself, and give the final answer."),
    "summarizer": ("You are the Summarizer, the last member of a team of specialists. Weigh what the "
                   "specialists found, settle on the answer, and give it."),
    "single": "You are a careful problem solver.",
}

LAYOUTS = {
    "sequential": ("planner", "critic", "refiner", "solver"),
    "hierarchical": ("math", "science", "code", "summarizer"),
}


@dataclasses.dataclass(frozen=True)
class Agent:
    role: str
    latent_steps: int = 0


def build_agents(layout: str = "sequential", roles: Optional[Sequence[str]] = None,
                 latent_steps=10) -> tuple[Agent, ...]:
    """Agents for a layout (or an explicit role list); the last one is the solver.

    ``latent_steps`` is one int for every upstream agent or a sequence, one per upstream agent.
    """
    if roles is None:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
        roles = LAYOUTS[layout]
    roles = tuple(roles)
    if not roles:
        raise ValueError("the agent list is empty")
    for r in roles:
        if r not in ROLE_BRIEFS:
            raise ValueError(f"unknown agent role {r!r}; known: {', '.join(ROLE_BRIEFS)}")
    upstream = len(roles) - 1
    steps = [latent_steps] * upstream if isinstance(latent_steps, int) else list(latent_steps)
    if len(steps) != upstream:
        raise ValueError(f"latent_steps lists {len(steps)} values for {upstream} upstream agents")
    if any(s < 0 for s in steps):
        raise ValueError(f"latent_steps must be >= 0, got {steps}")
    return tuple(Agent(r, s) for r, s in zip(roles[:-1], steps)) + (Agent(roles[-1], 0),)


class Question(str):
    """A question that carries context for some agents only (a plain ``str`` everywhere else).

    ``context`` maps a role name, or ``"upstream"`` (every agent before the solver), to
    text shown under "Facts:" in that agent's prompt. The solver sees only a key naming
    its own role, and a lone agent (Single) sees none: facts given to the upstream agents
    reach the solver only through the trace (or TextMAS notes).
    """

    def __new__(cls, text: str, context: Optional[dict] = None):
        obj = super().__new__(cls, text)
        obj.context = dict(context or {})
        return obj


def role_context(agent: Agent, question: str, *, is_solver: bool, has_team: bool) -> str:
    ctx = getattr(question, "context", None) or {}
    if not has_team or not ctx:
        return ""
    return ctx.get(agent.role) or ("" if is_solver else ctx.get("upstream", "")) or ""


def agent_messages(agent: Agent, question: str, *, answer_instruction: str = "", is_solver: bool = False,
                   notes: Sequence[tuple[str, str]] = (), has_team: bool = True) -> list[dict]:
    """Chat messages for one agent. ``notes`` are earlier agents' texts (TextMAS);
    a ``Question`` adds its per-role context (see ``role_context``)."""
    brief = ROLE_BRIEFS[agent.role] if has_team else ROLE_BRIEFS["single"]
    facts = role_context(agent, question, is_solver=is_solver, has_team=has_team)
    parts = ([f"Facts:\n{facts.strip()}"] if facts else []) + [f"Question:\n{question.strip()}"]
    if notes:
        shared = "\n\n".join(f"[{role.capitalize()}]\n{text.strip()}" for role, text in notes)
        parts.append(f"Notes from your teammates:\n{shared}")
    if is_solver and answer_instruction:
        parts.append(answer_instruction)
    elif not is_solver:
        parts.append("Keep it brief; a teammate will give the final answer.")
    return [{"role": "system", "content": brief}, {"role": "user", "content": "\n\n".join(parts)}]


def render_chat(tokenizer, messages: list[dict], enable_thinking: Optional[bool] = None) -> list[int]:
    """Token ids for a chat (``generation.chat_ids``: templates that reject a system turn get it
    folded into the user turn)."""
    from diffmas_jax.generation import chat_ids
    return chat_ids(tokenizer, messages, enable_thinking)
