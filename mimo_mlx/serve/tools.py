"""OpenAI's tools and structured-output fields of a chat-completions request, checked, and the
`tool_calls` of its answer. No HTTP and no MLX here.

    tools            function definitions, shown to the model through its chat template
    tool_choice      "auto" (the model decides), "none" (tools are not shown), "required" (at
                     least one call), or {"type": "function", "function": {"name": ...}}
    parallel_tool_calls  false: at most one call (the answer ends after it)
    response_format  {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}

"required", a named function and response_format are enforced while decoding (the grammar of
`generation.constrained`); with "auto" the model's own calls are parsed from its answer.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ..errors import MimoError
from ..generation.constrained import OutputFormat, json_format, tool_call_format
from ..generation.tool_calls import ToolCall
from .requests import APIError, ChatRequest, Limits, parse_chat_request

MAX_TOOLS = 128  # OpenAI's limit
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


@dataclass(frozen=True)
class Tools:
    """The tools of a request: `definitions` for the template (OpenAI's shape), which calls are
    wanted (`choice`: "auto", "required", or a function's name), and whether several may come."""

    definitions: list[dict]
    choice: str
    parallel: bool

    @property
    def names(self) -> list[str]:
        return [tool["function"]["name"] for tool in self.definitions]

    def output_format(self) -> OutputFormat | None:
        """The grammar that forces a call ("required" or a name); None for "auto"."""
        if self.choice == "auto":
            return None
        functions = [tool["function"] for tool in self.definitions]
        if self.choice != "required":
            functions = [f for f in functions if f["name"] == self.choice]
        return tool_call_format(functions, parallel=self.parallel)


def parse_chat(body: Any, limits: Limits) -> ChatRequest:
    """`requests.parse_chat_request`, with the request's tools and the format its answer must
    have (response_format, or a forced tool call)."""
    request = parse_chat_request(body, limits)
    tools, output_format = parse_tools(body), parse_response_format(body)
    if tools is not None and tools.choice != "auto":
        if output_format is not None:
            raise APIError(
                "'response_format' and a forced 'tool_choice' ask for two different answers",
                param="response_format",
            )
        output_format = tools.output_format()
    return dataclasses.replace(request, tools=tools, output_format=output_format)


def _function(tool: Any, where: str) -> dict:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise APIError(
            f'\'{where}\' must be {{"type": "function", "function": {{...}}}}', param=where
        )
    function = tool.get("function")
    if not isinstance(function, dict):
        raise APIError(f"'{where}.function' must be an object", param=f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise APIError(
            f"'{where}.function.name' must be 1 to 64 letters, digits, '_' or '-', got {name!r}",
            param=f"{where}.function.name",
        )
    for key, kind in (("description", str), ("parameters", dict)):
        if key in function and function[key] is not None and not isinstance(function[key], kind):
            expected = "a string" if kind is str else "an object (a JSON schema)"
            raise APIError(
                f"'{where}.function.{key}' must be {expected}", param=f"{where}.function.{key}"
            )
    return {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}


def parse_tools(body: dict) -> Tools | None:
    """The request's tools and tool_choice; None when there are none to offer (no tools, or
    tool_choice "none")."""
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise APIError(
            "'functions' is deprecated and not supported; use 'tools'", param="functions"
        )
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise APIError("'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise APIError("'tool_choice' needs 'tools'", param="tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise APIError(f"'tools' must be an array of at most {MAX_TOOLS} functions", param="tools")
    definitions = [_function(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    names = [d["function"]["name"] for d in definitions]
    if len(set(names)) != len(names):
        raise APIError("'tools' has two functions of the same name", param="tools")
    if choice is None or choice == "auto":
        choice = "auto"
    elif choice == "none":
        return None
    elif choice != "required":
        function = choice.get("function") if isinstance(choice, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise APIError(
                '\'tool_choice\' must be "none", "auto", "required" or {"type": "function", '
                '"function": {"name": ...}}',
                param="tool_choice",
            )
        if name not in names:
            raise APIError(
                f"'tool_choice' names {name!r}, which is not in 'tools'", param="tool_choice"
            )
        choice = name
    found = Tools(definitions, choice, parallel)
    _check(found.output_format(), "tools")
    return found


def parse_response_format(body: dict) -> OutputFormat | None:
    """The grammar response_format asks for (None for text)."""
    value = body.get("response_format")
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return _check(json_format(None), "response_format")
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise APIError(
                '\'response_format.json_schema\' must be {"name": ..., "schema": {...}}',
                param="response_format.json_schema",
            )
        if schema is not None and not isinstance(schema, dict):
            raise APIError(
                "'response_format.json_schema.schema' must be an object (a JSON schema)",
                param="response_format.json_schema.schema",
            )
        return _check(json_format(schema), "response_format.json_schema.schema")
    raise APIError(
        "'response_format.type' must be text, json_object or json_schema", param="response_format"
    )


def _check(fmt: OutputFormat | None, param: str) -> OutputFormat | None:
    """A format llguidance can enforce (or a 400 that says why not), before it is queued."""
    if fmt is None:
        return None
    try:
        fmt.check()
    except MimoError as err:
        raise APIError(str(err), param=param, code="invalid_schema") from None
    return fmt


def tool_call_entries(calls: list[ToolCall], first_index: int) -> list[dict]:
    """OpenAI's `tool_calls` entries (with the `index` stream deltas carry)."""
    return [
        {
            "index": first_index + i,
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for i, call in enumerate(calls)
    ]
