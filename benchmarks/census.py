"""Instruction census of the UAN kernels: SASS instructions per element against an H100's budget.

Usage::

    python benchmarks/census.py            # whole matrix -> benchmarks/results/census.{json,md}
    python benchmarks/census.py --ci --dtypes float32 --layouts nchw --components 3

DESIGN.md ("Roofline") explains why instructions, not FLOPs, are the second
roof: at its memory floor an H100 issues only ~316 instructions per element of
a float32 training step (158 for bfloat16). This script compiles every kernel
offline for sm_90, exactly as the real code launches it, and counts.

Compilation
-----------
* CUDA: each ``csrc/cuda/*.cu`` is compiled once with ``nvcc -cubin
  -arch=sm_90`` and the device-code flags of the real build (``setup.py``'s
  ``NVCC_FLAGS`` and ``CUDA_DEFINE_MACROS``, torch's ``COMMON_NVCC_FLAGS`` and
  extension macros), plus what ``.ci/check_cuda.sh`` adds to compile against a
  CPU build of torch (``-diag-suppress 3189 -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE``,
  ``-I csrc`` and torch's include paths). The kernel instance and launch
  configuration of each case are chosen by host code that only runs on a GPU;
  :func:`cuda_launch` mirrors it, in one place, and the output says so.
* Triton: the ``uan_kernels.triton`` launchers of the train, backward and eval passes
  run on meta tensors of each case (their tile geometry sees the tensors as
  CUDA tensors of an H100 with 132 SMs), every kernel launch is intercepted,
  and Triton's own binder turns it into the specialisation the JIT would
  compile (constexprs, divisibility and equal-to-1 attributes, num_warps,
  num_stages), which goes to ``triton.compile(..., target=GPUTarget("cuda", 90,
  32))``. Block sizes are whatever the launchers chose.

Counting method
---------------
From the disassembly (``nvdisasm -gi``: SASS annotated with source lines) the
census builds each kernel's control-flow graph and its natural loops. The
*steady-state loop* is the innermost loop that issues a global load. One
iteration of it is counted along one path from its header back to the header;
at each two-way branch the path follows, in this order:

1. a warp-divergence fallback (``BRA.DIV``): not taken (converged warps);
2. a branch on a launch flag (CUDA ``if (a.vector)``, ``if (mixture_grads)``;
   recognised from the branch's source line; the side is found from the
   source lines of the code on each side): the side the case's flag selects;
3. a branch around a nested loop (e.g. "no element left"): the loop's side;
4. a branch around a subroutine call or trap (division slow paths for
   denormal or special operands): the side without it;
5. anything else (lane-dependent conditions such as the lane-0 shared-memory
   stores of Triton's cross-warp reductions): both sides, since a warp whose
   lanes disagree issues both; the notes say how many such branches there
   were and what they add.

Every SASS instruction on the path counts, predicated-off ones included
(they are issued): loads, conversions, address arithmetic, loop control,
shuffles, barriers. Instructions per element:

* CUDA ``element_pass``: an iteration loads E elements per thread (one vector
  or E scalar loads; E = 16 / sizeof(dtype), but 4 where that is more and
  E x K > 32) and runs the math unrolled over them in registers, so per
  element = iteration / E. A slice's last elements that fill no group of E
  go one by one; that branch (``full_group``) follows the full group, the
  steady state.
* Triton: an iteration handles a BLOCK_C x BLOCK_N x BLOCK_L tile with 32 x
  num_warps threads, so per element = iteration x threads x tiles / (N C L),
  which charges the masked lanes of partial tiles to the real elements.

Approximations, stated next to the numbers: the per-block (CUDA unit,
Triton program) prologue and epilogue - loading the per-channel constants,
reducing and writing the partial sums - are outside the steady-state count.
They are reported separately as "overhead per thread" (roughly a lower
bound: loops there count one iteration; called subroutines are included) and
amortised over the elements each thread handles per block, which depends on
the grid. Kernels whose work is per (quantity, channel) rather than per
element (CUDA ``finalize_*``, the Triton finalize kernels) get resources
but no per-element count. Static counts assume every lane of a warp is
active; the last iteration of a thread's range may handle fewer elements.

Launch counts (kernels and ATen ops per training step and eval forward) come
from :mod:`launch_counts`, run in a child process under the Triton
interpreter; the CUDA element-pass kernels inside the fused C++ operators,
invisible on CPU, are added from :data:`CUDA_PASSES`.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import launch_counts

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    # The census describes this checkout's sources: import its package, not another installed copy.
    sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------- #
# The GPU modelled, and the budget
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Gpu:
    """Issue rate, bandwidth and per-SM limits of the modelled GPU (H100 SXM, sm_90)."""

    name: str = "H100 SXM (sm_90)"
    sms: int = 132
    schedulers_per_sm: int = 4
    clock_hz: float = 1.755e9
    # Device-to-device copy measured on an H100: 2.75-3.0 TB/s.
    bandwidth_bytes_per_s: float = 3.0e12
    registers_per_sm: int = 65536
    threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    max_warps_per_sm: int = 64
    shared_per_sm: int = 228 * 1024
    # The driver reserves 1 KiB of shared memory per block on sm_80 and later.
    shared_reserved_per_block: int = 1024
    shared_unit: int = 128
    # Registers are allocated per warp, in units of 256.
    register_unit: int = 256

    @property
    def warp_instructions_per_s(self) -> float:
        return self.sms * self.schedulers_per_sm * self.clock_hz

    @property
    def thread_instructions_per_s(self) -> float:
        return self.warp_instructions_per_s * 32

    def budget(self, bytes_per_element: float) -> float:
        """Thread instructions per element issued while HBM moves ``bytes_per_element``."""
        return bytes_per_element / self.bandwidth_bytes_per_s * self.thread_instructions_per_s


H100 = Gpu()

# Tensor-sized memory passes (reads + writes of N*C*L elements) per kernel pass, DESIGN.md "Roofline".
PASS_TRAFFIC = {"statistics": 1, "normalize": 2, "backward reduce": 2, "backward elementwise": 3, "eval": 2}
TRAIN_PASSES = ("statistics", "normalize", "backward reduce", "backward elementwise")
UPDATES = ("weight", "moving_average")


def budget_lines(gpu: Gpu = H100) -> List[str]:
    """The arithmetic behind the per-element instruction budgets."""
    lines = [
        f"{gpu.name}: {gpu.sms} SMs x {gpu.schedulers_per_sm} schedulers x {gpu.clock_hz / 1e9:.3f} GHz = "
        f"{gpu.warp_instructions_per_s / 1e12:.3f}e12 warp-instructions/s = "
        f"{gpu.thread_instructions_per_s / 1e12:.1f}e12 thread-instructions/s; "
        f"HBM at {gpu.bandwidth_bytes_per_s / 1e12:.1f} TB/s (device copy measured 2.75-3.0 TB/s).",
    ]
    train = sum(PASS_TRAFFIC[p] for p in TRAIN_PASSES)
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        step = train * size
        lines.append(
            f"{dtype}: a training step moves {train} passes x {size} B = {step} B/element, which takes "
            f"{step / gpu.bandwidth_bytes_per_s * 1e12:.2f} ps/element; in that time the GPU issues "
            f"{gpu.budget(step):.0f} instructions/element (eval forward, {PASS_TRAFFIC['eval']} passes: "
            f"{gpu.budget(PASS_TRAFFIC['eval'] * size):.0f}). Per pass: "
            + ", ".join(f"{p} {gpu.budget(passes * size):.0f}" for p, passes in PASS_TRAFFIC.items() if p != "eval")
            + "."
        )
    return lines


# --------------------------------------------------------------------------- #
# The matrix
# --------------------------------------------------------------------------- #

DTYPES = ("float32", "bfloat16")
LAYOUTS = ("nchw", "channels_last")
COMPONENTS = (1, 3, 8, 16)
SHAPES = ((256, 128, 36, 36), (64, 256, 16, 16), (64, 64, 14, 14))
BACKENDS = ("cuda", "triton")
# --ci fails on any spill at K <= this.
CI_MAX_SPILL_FREE_COMPONENTS = 8
EPS = 1e-5


def shape_name(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


@dataclass(frozen=True)
class Case:
    backend: str
    dtype: str
    layout: str
    components: int
    shape: Tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 2

    @property
    def channels_last(self) -> bool:
        return self.layout == "channels_last"

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    def label(self) -> str:
        return f"{self.backend} {self.dtype} {self.layout} K={self.components} {shape_name(self.shape)}"


# --------------------------------------------------------------------------- #
# Disassembly: instructions, control flow, loops, paths
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Instruction:
    address: int
    predicate: str  # "" or e.g. "@!P0"
    opcode: str
    operands: str
    target: Optional[str]  # label of a BRA / CALL
    frames: Tuple[Tuple[str, int], ...]  # source (file, line), innermost inlined frame first

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def conditional(self) -> bool:
        return (self.predicate not in ("", "@PT")) or ".DIV" in self.opcode

    @property
    def global_load(self) -> bool:
        return self.base in ("LDG", "LDGSTS", "UTMALDG")


_SECTION = re.compile(r"^\.text\.(\S+):\s*$")
_LABEL = re.compile(r"^([.$\w][\w.$@]*):\s*$")
_LINE_INFO = re.compile(r'^\s*//## File "(?P<file>[^"]+)", line (?P<line>\d+)')
_INSTRUCTION = re.compile(r"^\s*/\*(?P<address>[0-9a-f]+)\*/\s+(?P<body>[^;]*);")
_PREDICATE = re.compile(r"^(@!?U?P[T0-9]+)\s+")
_TARGET = re.compile(r"`\(([^)]+)\)")


@dataclass(eq=False)
class Function:
    """The SASS of one kernel (with the subroutines it calls) and its labels."""

    name: str
    instructions: List[Instruction]
    labels: Dict[str, int]  # label -> address


def parse_disassembly(text: str) -> Dict[str, Function]:
    """Functions of ``nvdisasm -c -gi`` output, by symbol name."""
    functions: Dict[str, Function] = {}
    current: Optional[Function] = None
    frames: List[Tuple[str, int]] = []
    in_line_info = False
    pending_labels: List[str] = []
    for raw in text.splitlines():
        section = _SECTION.match(raw)
        if section:
            current = functions.setdefault(section.group(1), Function(section.group(1), [], {}))
            pending_labels, frames = [], []
            continue
        if current is None:
            continue
        info = _LINE_INFO.match(raw)
        if info:
            if not in_line_info:
                frames = []
            frames.append((info.group("file"), int(info.group("line"))))
            in_line_info = True
            continue
        in_line_info = False
        label = _LABEL.match(raw.strip())
        if label:
            pending_labels.append(label.group(1))
            continue
        match = _INSTRUCTION.match(raw)
        if not match:
            continue
        address = int(match.group("address"), 16)
        body = match.group("body").strip()
        predicate = ""
        pred = _PREDICATE.match(body)
        if pred:
            predicate = pred.group(1)
            body = body[pred.end():]
        opcode, _, operands = body.partition(" ")
        target = _TARGET.search(operands)
        for name in pending_labels:
            current.labels[name] = address
        pending_labels = []
        current.instructions.append(
            Instruction(address, predicate, opcode, operands.strip(), target.group(1) if target else None,
                        tuple(frames))
        )
    return functions


@dataclass(eq=False)
class Block:
    index: int
    instructions: List[Instruction]
    successors: List["Block"] = field(default_factory=list)  # [fallthrough, taken] for two-way branches

    @property
    def address(self) -> int:
        return self.instructions[0].address


@dataclass(eq=False)
class Loop:
    header: Block
    body: set
    latches: List[Block]
    parent: Optional["Loop"] = None
    children: List["Loop"] = field(default_factory=list)

    def contains(self, other: "Loop") -> bool:
        while other is not None:
            if other is self:
                return True
            other = other.parent
        return False


@dataclass
class CountedPath:
    """Instructions along one path, and the loops it entered (counted separately)."""

    instructions: int = 0
    inner: List[Tuple[Loop, "CountedPath"]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    # Branches counted on both sides (rule 5 of the module docstring) and what their longer sides add.
    divergent_branches: int = 0
    divergent_instructions: int = 0


# resolver(branch, fallthrough-side instructions, taken-side instructions) -> True: fallthrough,
# False: taken, None: not a launch-flag branch (the generic rules decide).
Resolver = Callable[[Instruction, List[Instruction], List[Instruction]], Optional[bool]]


def _never(branch, fallthrough, taken) -> Optional[bool]:
    return None


class ControlFlow:
    """Basic blocks, natural loops and counted paths of one function."""

    def __init__(self, function: Function):
        self.function = function
        instructions = function.instructions
        by_address = {ins.address: i for i, ins in enumerate(instructions)}
        leaders = {0}
        for i, ins in enumerate(instructions):
            if ins.base in ("BRA", "EXIT", "RET") and i + 1 < len(instructions):
                leaders.add(i + 1)
            if ins.base in ("BRA", "CALL") and ins.target in function.labels:
                leaders.add(by_address[function.labels[ins.target]])
        starts = sorted(leaders)
        ends = starts[1:] + [len(instructions)]
        self.blocks = [Block(n, instructions[s:e]) for n, (s, e) in enumerate(zip(starts, ends))]
        block_at = {block.address: block for block in self.blocks}
        for n, block in enumerate(self.blocks):
            last = block.instructions[-1]
            following = self.blocks[n + 1] if n + 1 < len(self.blocks) else None
            taken = block_at.get(function.labels.get(last.target, -1)) if last.base == "BRA" else None
            if last.base == "BRA":
                block.successors = [following, taken] if last.conditional and taken is not following else [taken]
            elif last.base in ("EXIT", "RET"):
                block.successors = [following] if last.conditional else []
            else:
                block.successors = [following]
            block.successors = [s for s in block.successors if s is not None]
        self.block_at = block_at
        self.entries = [self.blocks[0]] + [
            block_at[function.labels[ins.target]]
            for ins in instructions if ins.base == "CALL" and ins.target in function.labels
        ]
        self.loops = self._find_loops()
        self.loop_of_header = {loop.header: loop for loop in self.loops}

    def _find_loops(self) -> List[Loop]:
        """Natural loops from the back edges of a depth-first search (loops sharing a header merge)."""
        back_edges: Dict[Block, List[Block]] = {}
        state: Dict[Block, int] = {}  # 1: on the stack, 2: done
        for entry in self.entries:
            if entry in state:
                continue
            stack = [(entry, iter(entry.successors))]
            state[entry] = 1
            while stack:
                block, successors = stack[-1]
                successor = next(successors, None)
                if successor is None:
                    state[block] = 2
                    stack.pop()
                elif state.get(successor) == 1:
                    back_edges.setdefault(successor, []).append(block)
                elif successor not in state:
                    state[successor] = 1
                    stack.append((successor, iter(successor.successors)))
        predecessors: Dict[Block, List[Block]] = {}
        for block in self.blocks:
            for successor in block.successors:
                predecessors.setdefault(successor, []).append(block)
        loops = []
        for header, latches in back_edges.items():
            body = {header}
            work = [latch for latch in latches if latch is not header]
            body.update(work)
            while work:
                for pred in predecessors.get(work.pop(), []):
                    if pred not in body:
                        body.add(pred)
                        work.append(pred)
            loops.append(Loop(header, body, latches))
        loops.sort(key=lambda loop: len(loop.body))
        for n, loop in enumerate(loops):
            loop.parent = next((outer for outer in loops[n + 1:] if loop.body < outer.body), None)
            if loop.parent is not None:
                loop.parent.children.append(loop)
        return loops

    def steady_loops(self) -> List[Loop]:
        """Innermost loops that issue a global load: the loops that stream elements."""
        loading = [
            loop for loop in self.loops
            if any(ins.global_load for block in loop.body for ins in block.instructions)
        ]
        return [loop for loop in loading if not any(inner is not loop and loop.contains(inner) for inner in loading)]

    # ---- paths ---------------------------------------------------------------

    def _reach(self, start: Block, region: Optional[Loop]) -> set:
        """Blocks reachable from ``start`` within ``region`` without taking its back edges."""
        seen = {start}
        work = [start]
        while work:
            for successor in work.pop().successors:
                if successor in seen or (region is not None and (successor not in region.body or
                                                                 successor is region.header)):
                    continue
                seen.add(successor)
                work.append(successor)
        return seen

    def _choose(self, block: Block, fallthrough: Block, taken: Block, region: Optional[Loop],
                resolver: Resolver, path: CountedPath) -> Block:
        branch = block.instructions[-1]
        if ".DIV" in branch.opcode:
            return fallthrough
        reach_f, reach_t = self._reach(fallthrough, region), self._reach(taken, region)
        only_f, only_t = reach_f - reach_t, reach_t - reach_f

        def instructions(blocks):
            return [ins for b in sorted(blocks, key=lambda b: b.index) for ins in b.instructions]

        flag = resolver(branch, instructions(only_f), instructions(only_t))
        if flag is not None:
            return fallthrough if flag else taken
        loop_f = any(b in self.loop_of_header for b in only_f)
        loop_t = any(b in self.loop_of_header for b in only_t)
        if loop_f != loop_t:
            return fallthrough if loop_f else taken
        slow_f = any(ins.base in ("CALL", "BPT") for ins in instructions(only_f))
        slow_t = any(ins.base in ("CALL", "BPT") for ins in instructions(only_t))
        if slow_f != slow_t:
            return taken if slow_f else fallthrough
        # Unattributed, e.g. the lane-0 shared-memory stores of a cross-warp reduction: a
        # warp whose lanes disagree issues both sides, so both count.
        cost_f, cost_t = len(instructions(only_f)), len(instructions(only_t))
        path.divergent_branches += 1
        path.divergent_instructions += max(cost_f, cost_t)
        path.instructions += max(cost_f, cost_t)
        return fallthrough if cost_f <= cost_t else taken

    def _exit_of(self, loop: Loop, region: Optional[Loop]) -> Optional[Block]:
        """Where control goes when ``loop`` ends (preferring exits from its latches)."""
        exits = [
            (block not in loop.latches, block.index, successor)
            for block in loop.body for successor in block.successors
            if successor not in loop.body and (region is None or successor in region.body)
        ]
        if not exits:
            return None
        after = min(exits, key=lambda e: e[:2])[2]
        return None if region is not None and after is region.header else after

    def walk(self, start: Block, region: Optional[Loop], resolver: Resolver, skip: Optional[Loop] = None,
             separate_inner: bool = False) -> CountedPath:
        """Count one path from ``start``: one iteration of ``region`` (ends at its back edge), or
        to the function's exit when ``region`` is None.

        Nested loops met on the way: ``skip`` costs nothing; with ``separate_inner``
        each is walked for one iteration and returned in ``CountedPath.inner``; otherwise
        it is counted once inline (with a note). Called subroutines are included.
        """
        path = CountedPath()
        block: Optional[Block] = start
        visited = set()
        while block is not None:
            loop = self.loop_of_header.get(block)
            nested = loop is not None and block is not start and loop is not region and (
                region is None or region.contains(loop))
            if nested:
                if loop is not skip:
                    inner = self.walk(loop.header, loop, resolver, skip)
                    if separate_inner:
                        path.inner.append((loop, inner))
                    else:
                        path.instructions += inner.instructions
                        path.notes += inner.notes
                        path.divergent_branches += inner.divergent_branches
                        path.divergent_instructions += inner.divergent_instructions
                        if skip is None or not loop.contains(skip):
                            path.notes.append(f"loop at 0x{loop.header.address:x} counted once")
                block = self._exit_of(loop, region)
                continue
            if block in visited:
                path.notes.append(f"path revisits 0x{block.address:x}; stopped")
                break
            visited.add(block)
            path.instructions += len(block.instructions)
            for ins in block.instructions:
                if ins.base == "CALL" and ins.target in self.function.labels:
                    callee = self.walk(self.block_at[self.function.labels[ins.target]], None, resolver)
                    path.instructions += callee.instructions
            successors = [
                s for s in block.successors
                if region is None or (s in region.body and s is not region.header)
            ]
            if len(successors) == 2:
                block = self._choose(block, successors[0], successors[1], region, resolver, path)
            else:
                block = successors[0] if successors else None
        return path


# ---- launch-flag branches, from source lines ---------------------------------


@functools.lru_cache(maxsize=None)
def _source_lines(path: str) -> Tuple[str, ...]:
    try:
        return tuple(Path(path).read_text().splitlines())
    except OSError:
        return ()


def _matching_brace(lines: Sequence[str], line: int, column: int) -> Optional[int]:
    """1-based line of the brace closing the one at ``lines[line - 1][column]``."""
    depth = 0
    for n in range(line - 1, len(lines)):
        text = lines[n].split("//")[0]
        for ch in text[column if n == line - 1 else 0:]:
            depth += (ch == "{") - (ch == "}")
            if depth == 0:
                return n + 1
    return None


@dataclass(frozen=True)
class IfStatement:
    line: int
    condition: str
    then_lines: range
    else_lines: range

    def encloses(self, line: int) -> bool:
        return line == self.line or line in self.then_lines or line in self.else_lines


_IF = re.compile(r"\s*(?:\}\s*else\s+)?if\s*\((.*)\)\s*\{\s*(//.*)?$")


@functools.lru_cache(maxsize=None)
def if_statements(path: str) -> Tuple[IfStatement, ...]:
    """Every braced ``if (...) {...} [else {...}]`` of a source file, with its line ranges."""
    lines = _source_lines(path)
    statements = []
    for number, text in enumerate(lines, start=1):
        match = _IF.match(text)
        if not match:
            continue
        then_end = _matching_brace(lines, number, text.rindex("{"))
        if then_end is None:
            continue
        else_lines = range(0)
        tail = lines[then_end - 1].split("//")[0]
        closing = tail.rindex("}") if "}" in tail else len(tail)
        if re.match(r"\s*else\s*\{", tail[closing + 1:]):
            else_end = _matching_brace(lines, then_end, tail.index("{", closing))
            if else_end is not None:
                else_lines = range(then_end + 1, else_end)
        # The lines between the braces (the closing brace lines carry no code).
        statements.append(IfStatement(number, match.group(1).strip(), range(number + 1, then_end), else_lines))
    return tuple(statements)


def flag_resolver(flags: Dict[str, bool]) -> Resolver:
    """Resolves branches of ``if (<flag>) {...} [else {...}]`` statements whose condition is a key of ``flags``.

    The candidate statements are those on the branch instruction's source
    line or enclosing it (innermost first; the compiler may attribute the
    branch to a line of either block). The side that runs the then-block is
    the one whose own code (not shared with the other side) has more
    instructions from the then-block's lines, net of the else-block's.
    """

    def score(instructions: List[Instruction], file: str, statement: IfStatement) -> int:
        total = 0
        for ins in instructions:
            lines = [line for f, line in ins.frames if f == file]
            total += any(line in statement.then_lines for line in lines)
            total -= any(line in statement.else_lines for line in lines)
        return total

    def resolve(branch: Instruction, fallthrough: List[Instruction], taken: List[Instruction]) -> Optional[bool]:
        for file, line in branch.frames:
            candidates = [s for s in if_statements(file) if s.condition in flags and s.encloses(line)]
            for statement in sorted(candidates, key=lambda s: len(s.then_lines) + len(s.else_lines)):
                f_score, t_score = score(fallthrough, file, statement), score(taken, file, statement)
                if f_score != t_score:
                    return (f_score > t_score) == flags[statement.condition]
        return None

    return resolve


# --------------------------------------------------------------------------- #
# Resources and occupancy
# --------------------------------------------------------------------------- #


@dataclass
class Resources:
    registers: int = 0
    stack_bytes: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    static_shared: int = 0


def parse_ptxas_log(text: str) -> Dict[str, Resources]:
    """Per-function resources from ptxas ``-v`` output."""
    resources: Dict[str, Resources] = {}
    current: Optional[Resources] = None
    for line in text.splitlines():
        named = re.search(r"(?:Compiling entry function '([^']+)'|Function properties for (\S+))", line)
        if named:
            current = resources.setdefault(named.group(1) or named.group(2), Resources())
            continue
        if current is None:
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if frame:
            current.stack_bytes, current.spill_stores, current.spill_loads = map(int, frame.groups())
        used = re.search(r"Used (\d+) registers", line)
        if used:
            current.registers = int(used.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current.static_shared = int(smem.group(1)) if smem else 0
    return resources


@dataclass
class Occupancy:
    blocks_per_sm: int
    fraction: float
    limiter: str


def occupancy(registers: int, threads_per_block: int, shared_bytes: int, gpu: Gpu = H100) -> Occupancy:
    """Theoretical occupancy (resident warps / max warps) from registers, block size and shared memory."""
    warps = -(-threads_per_block // 32)
    registers_per_warp = -(-max(registers, 1) * 32 // gpu.register_unit) * gpu.register_unit
    shared = -(-(shared_bytes + gpu.shared_reserved_per_block) // gpu.shared_unit) * gpu.shared_unit
    limits = {
        "registers": gpu.registers_per_sm // registers_per_warp // warps,
        "threads": min(gpu.threads_per_sm, gpu.max_warps_per_sm * 32) // (warps * 32),
        "blocks": gpu.max_blocks_per_sm,
        "shared memory": gpu.shared_per_sm // shared,
    }
    limiter = min(limits, key=limits.get)
    blocks = limits[limiter]
    return Occupancy(blocks, blocks * warps / gpu.max_warps_per_sm, limiter)


# --------------------------------------------------------------------------- #
# Results
# --------------------------------------------------------------------------- #


@dataclass
class KernelResult:
    """One kernel of one case: resources, occupancy and instruction counts."""

    backend: str
    dtype: str
    layout: str
    components: int
    shape: str
    pass_name: str  # statistics, normalize, backward reduce, backward elementwise, eval
    update: str  # weight / moving_average for the backward elementwise pass, else ""
    kernel: str
    launch: str  # block sizes, flags and grid
    per_element_kernel: bool = True
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack_bytes: int = 0
    shared_bytes: int = 0
    threads_per_block: int = 0
    blocks_per_sm: int = 0
    occupancy: float = 0.0
    occupancy_limiter: str = ""
    iteration_instructions: int = 0  # steady-state loop, outside per-element inner loops
    element_loop_instructions: int = 0  # per-element inner loops (CUDA), per iteration of each
    elements_per_thread_per_iteration: float = 0.0
    instructions_per_element: float = 0.0
    overhead_instructions: int = 0  # per thread and block/program, outside the steady-state loop
    elements_per_thread_per_block: float = 0.0
    overhead_per_element: float = 0.0
    notes: List[str] = field(default_factory=list)
    error: str = ""

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def _set_resources(row: KernelResult, resources: Resources, threads: int, dynamic_shared: int = 0) -> None:
    row.registers = resources.registers
    row.spill_stores, row.spill_loads = resources.spill_stores, resources.spill_loads
    row.stack_bytes = resources.stack_bytes
    row.shared_bytes = resources.static_shared + dynamic_shared
    row.threads_per_block = threads
    occ = occupancy(row.registers, threads, row.shared_bytes)
    row.blocks_per_sm, row.occupancy, row.occupancy_limiter = occ.blocks_per_sm, occ.fraction, occ.limiter


def _steady_state(flow: ControlFlow, resolver: Resolver) -> Tuple[Loop, CountedPath, CountedPath]:
    """The steady-state loop, one iteration of it, and the kernel's path outside it."""
    loops = flow.steady_loops()
    if not loops:
        raise RuntimeError("no loop issuing a global load was found")
    loop = max(loops, key=lambda l: len(l.body))
    iteration = flow.walk(loop.header, loop, resolver, separate_inner=True)
    if len(loops) > 1:
        iteration.notes.append(
            f"{len(loops)} element loops; the largest (0x{loop.header.address:x}) counted"
        )
    overhead = flow.walk(flow.blocks[0], None, resolver, skip=loop)
    return loop, iteration, overhead


# --------------------------------------------------------------------------- #
# Tools
# --------------------------------------------------------------------------- #


def _triton_tool(name: str) -> Optional[str]:
    try:
        import triton

        return getattr(triton.knobs.nvidia, name).path
    except (ImportError, AttributeError, RuntimeError):
        return None


def nvdisasm_path() -> str:
    """nvdisasm from PATH (a CUDA toolkit) or the copy Triton ships."""
    path = shutil.which("nvdisasm") or _triton_tool("nvdisasm")
    if not path:
        raise RuntimeError("nvdisasm not found (neither on PATH nor in Triton's backends/nvidia/bin)")
    return path


def disassemble(cubin: Path) -> Dict[str, Function]:
    result = subprocess.run([nvdisasm_path(), "-c", "-gi", str(cubin)], capture_output=True, text=True, check=True)
    return parse_disassembly(result.stdout)


def _tool_version(command: Sequence[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "not found"
    found = re.search(r"release ([\d.]+)", out)
    return found.group(1) if found else out.strip().splitlines()[-1]


# --------------------------------------------------------------------------- #
# CUDA
# --------------------------------------------------------------------------- #

CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
CUDA_HEADERS = sorted((ROOT / "csrc" / "cuda").glob("*.cuh"))

# The passes of a CUDA training step / eval forward: element_pass<Op>, whether
# the launch writes partial sums (a.accumulate), and the per-channel kernel
# that finalizes them (one more launch). From forward_train, forward_eval and
# backward in csrc/cuda/uan_cuda.cu; mixture_grads is True when mu, log_sigma,
# mix_logits need gradients (update="weight").
CUDA_PASSES = (
    ("statistics", "", "Statistics", True, "finalize_statistics"),
    ("normalize", "", "Normalize", False, None),
    ("backward reduce", "", "BackwardReduce", True, "finalize_backward"),
    ("backward elementwise", "weight", "BackwardElementwise", True, "finalize_parameters"),
    ("backward elementwise", "moving_average", "BackwardElementwise", False, None),
    ("eval", "", "Normalize", False, None),
)
# Threads per block of the finalize kernels (kThreads unless named here).
_FINALIZE_THREADS = {"finalize_parameters": "kParameterThreads"}
# finalize_parameters is templated on the accumulation type, the others on the input type.
_FINALIZE_ON_ACCUMULATION_TYPE = {"finalize_parameters"}
_CUDA_TYPE_CODES = {"float32": "f", "bfloat16": "N3c108BFloat16E"}


def _setup_literal(name: str):
    """A literal assigned at module level in setup.py (the build's single home for it)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError(f"setup.py defines no {name}")


def nvcc_command(source: Path, output: Path) -> List[str]:
    """``nvcc -cubin`` for sm_90 with the build's device-code flags (see the module docstring)."""
    from torch.utils import cpp_extension

    import torch

    defines = [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in _setup_literal("CUDA_DEFINE_MACROS")]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    includes = [f"-I{ROOT / 'csrc'}"] + [f"-I{p}" for p in cpp_extension.include_paths()]
    return [
        "nvcc", "-cubin", "-arch=sm_90", *cpp_extension.COMMON_NVCC_FLAGS, *_setup_literal("NVCC_FLAGS"),
        *defines, "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", abi,
        "-diag-suppress", "3189", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", *includes,
        "-Xptxas", "-v", str(source), "-o", str(output),
    ]


@dataclass
class CompiledCuda:
    functions: Dict[str, Function]
    resources: Dict[str, Resources]


def compile_cuda(workdir: Path) -> CompiledCuda:
    """Every csrc/cuda/*.cu as one sm_90 cubin each: disassembly and ptxas resources of all kernels."""
    if shutil.which("nvcc") is None:
        raise RuntimeError("nvcc is not on PATH")
    functions: Dict[str, Function] = {}
    resources: Dict[str, Resources] = {}
    for source in CUDA_SOURCES:
        cubin = workdir / (source.stem + ".cubin")
        result = subprocess.run(nvcc_command(source, cubin), capture_output=True, text=True, cwd=ROOT)
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed on {source.relative_to(ROOT)}:\n{result.stderr[-4000:]}")
        functions.update(disassemble(cubin))
        resources.update(parse_ptxas_log(result.stderr))
    return CompiledCuda(functions, resources)


@functools.lru_cache(maxsize=None)
def cuda_constants() -> Dict[str, int]:
    """kThreads, kWarp, kLoadBytes, kMaxUnrolledComponents, kLargeKElements, kMaxElementsPerThread,
    kParameterThreads as defined in the CUDA sources."""
    text = "\n".join(source.read_text() for source in CUDA_SOURCES + CUDA_HEADERS)
    names = ("kThreads", "kWarp", "kLoadBytes", "kMaxUnrolledComponents", "kLargeKElements",
             "kMaxElementsPerThread", "kParameterThreads")
    found = {m.group(1): int(m.group(2)) for m in re.finditer(r"constexpr\s+\w+\s+(\w+)\s*=\s*(\d+)\s*;", text)}
    missing = [n for n in names if n not in found]
    if missing:
        raise RuntimeError(f"CUDA source defines no {', '.join(missing)}")
    return {n: found[n] for n in names}


@dataclass
class CudaLaunch:
    vector: bool
    evenly_spaced: bool
    elements_per_iteration: int
    block: Tuple[int, int]
    tiles: int
    chunk: int
    slices: int
    grid: int

    @property
    def threads(self) -> int:
        return self.block[0] * self.block[1]

    def describe(self, accumulate: bool) -> str:
        access = (f"{self.elements_per_iteration}-element vector" if self.vector
                  else f"{self.elements_per_iteration} scalar")
        return (f"block {self.block[0]}x{self.block[1]}, {access} loads, "
                f"{'partials' if accumulate else 'no partials'}, grid {self.grid} ({self.tiles}x{self.slices} units)")


def cuda_launch(case: Case, blocks_per_sm: int, gpu: Gpu = H100) -> CudaLaunch:
    """How csrc/cuda/uan_passes.cuh launches element_pass for ``case`` (host code, mirrored here only).

    launch: vector access when channels are not innermost and L is a
    multiple of E (fresh allocations are aligned); E as iteration_elements in
    uan_cuda.cuh: kLoadBytes / itemsize, or kLargeKElements when that is more
    and E x K exceeds kMaxUnrolledComponents.
    pass_args: a channel's elements are evenly spaced when channels are
    innermost (channels_last, or L == 1).
    launch_shape: TC = min(kWarp, C rounded up to a power of 2) threads over
    channels when channels are innermost (channels_last), else 1; TR =
    kThreads / TC; enough slices per channel to fill one wave of resident
    blocks (``blocks_per_sm`` from the occupancy computed here), each slice at
    least one iteration and at most kMaxElementsPerThread elements per thread.
    """
    k = cuda_constants()
    n, c = case.shape[:2]
    length = math.prod(case.shape[2:])
    per_iteration = k["kLoadBytes"] // case.itemsize
    if per_iteration > k["kLargeKElements"] and per_iteration * case.components > k["kMaxUnrolledComponents"]:
        per_iteration = k["kLargeKElements"]
    channels_inner = case.channels_last or length == 1
    vector = not channels_inner and length % per_iteration == 0
    evenly_spaced = channels_inner
    tc = 1
    while channels_inner and tc < k["kWarp"] and tc < c:
        tc *= 2
    tr = k["kThreads"] // tc
    tiles = -(-c // tc)
    resident = gpu.sms * max(blocks_per_sm, 1)
    elements = n * length
    chunk = -(-elements // max(1, resident // tiles))
    chunk = min(max(chunk, tr * per_iteration), tr * k["kMaxElementsPerThread"])
    vec = per_iteration if vector else 1
    chunk = -(-chunk // vec) * vec
    slices = -(-elements // chunk)
    return CudaLaunch(vector, evenly_spaced, per_iteration, (tc, tr), tiles, chunk, slices, min(tiles * slices, resident))


def find_cuda_kernel(functions: Dict[str, Function], op: str, dtype: str, components: int) -> Function:
    """The element_pass<Op<scalar_t, K>> instance, by its mangled name."""
    pattern = re.compile(
        rf"element_passINS0_{len(op)}{op}I{re.escape(_CUDA_TYPE_CODES[dtype])}Li{components}E"
    )
    matches = [f for name, f in functions.items() if pattern.search(name)]
    if len(matches) != 1:
        raise RuntimeError(f"{len(matches)} kernels match element_pass<{op}<{dtype}, {components}>>")
    return matches[0]


def find_finalize_kernel(functions: Dict[str, Function], kernel: str, dtype: str) -> Function:
    """The finalize kernel instance for ``dtype``, by its mangled name."""
    code = _CUDA_TYPE_CODES["float32" if kernel in _FINALIZE_ON_ACCUMULATION_TYPE else dtype]
    pattern = re.compile(rf"{len(kernel)}{kernel}I{re.escape(code)}E")
    matches = [f for name, f in functions.items() if pattern.search(name)]
    if len(matches) != 1:
        raise RuntimeError(f"{len(matches)} kernels match {kernel}<{dtype}>")
    return matches[0]


@functools.lru_cache(maxsize=None)
def _flow(function: Function) -> ControlFlow:
    return ControlFlow(function)


def cuda_rows(case: Case, compiled: CompiledCuda) -> List[KernelResult]:
    """Every kernel of a CUDA training step and eval forward for ``case``."""
    rows = []
    for pass_name, update, op, accumulate, finalize in CUDA_PASSES:
        row = KernelResult(case.backend, case.dtype, case.layout, case.components, shape_name(case.shape),
                           pass_name, update, f"element_pass<{op}>", "")
        try:
            function = find_cuda_kernel(compiled.functions, op, case.dtype, case.components)
            threads = cuda_constants()["kThreads"]
            _set_resources(row, compiled.resources[function.name], threads)
            launch = cuda_launch(case, row.blocks_per_sm)
            row.launch = launch.describe(accumulate)
            # full_group: a slice's last, partial group is not the steady state.
            flags = {"a.vector": launch.vector, "mixture_grads": accumulate, "a.accumulate": accumulate,
                     "full_group": True, "a.evenly_spaced": launch.evenly_spaced}
            loop, iteration, overhead = _steady_state(_flow(function), flag_resolver(flags))
            e = launch.elements_per_iteration
            row.iteration_instructions = iteration.instructions
            row.element_loop_instructions = sum(inner.instructions for _, inner in iteration.inner)
            row.elements_per_thread_per_iteration = e
            # The rolled element loop runs once per element; the rest of the iteration once per E.
            row.instructions_per_element = iteration.instructions / e + row.element_loop_instructions
            row.overhead_instructions = overhead.instructions
            row.elements_per_thread_per_block = launch.chunk / launch.block[1]
            units = launch.tiles * launch.slices
            row.overhead_per_element = overhead.instructions * units * launch.threads / case.elements
            row.notes = _notes(iteration)
            # Both paths unroll their E elements: no loop inside the iteration.
            if iteration.inner:
                row.notes.append(f"{len(iteration.inner)} element loops in the iteration (expected none)")
        except (RuntimeError, KeyError) as err:
            row.error = str(err)
        rows.append(row)
        if finalize:
            rows.append(_finalize_row(case, pass_name, update, finalize, compiled))
    return rows


def _finalize_row(case: Case, pass_name: str, update: str, kernel: str, compiled: CompiledCuda) -> KernelResult:
    launch = ("one block, a thread per (component, channel)" if kernel == "finalize_parameters"
              else "one warp per channel")
    row = KernelResult(case.backend, case.dtype, case.layout, case.components, shape_name(case.shape),
                       pass_name, update, kernel, launch, per_element_kernel=False)
    try:
        threads = cuda_constants()[_FINALIZE_THREADS.get(kernel, "kThreads")]
        _set_resources(row, compiled.resources[find_finalize_kernel(compiled.functions, kernel, case.dtype).name],
                       threads)
    except (RuntimeError, KeyError) as err:
        row.error = str(err)
    return row


def _notes(path: CountedPath) -> List[str]:
    """Notes of a steady-state iteration and its element loops, the two-sided branches summed up."""
    paths = [path] + [inner for _, inner in path.inner]
    notes = sorted({note for p in paths for note in p.notes})
    branches = sum(p.divergent_branches for p in paths)
    if branches:
        notes.append(f"{branches} unattributed branches (e.g. lane-0 stores of reductions) counted on both sides: "
                     f"+{sum(p.divergent_instructions for p in paths)} instructions")
    return notes


# --------------------------------------------------------------------------- #
# Triton
# --------------------------------------------------------------------------- #

TRITON_TARGET = ("cuda", 90, 32)


@dataclass
class TritonLaunch:
    """A kernel launch as the JIT would compile it."""

    kernel: object  # JITFunction
    grid: Tuple[int, ...]
    arguments: Dict[str, object]  # every parameter, constexprs included, by name
    signature: Dict[str, str]
    constexprs: Dict
    attrs: Dict
    options: object

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def key(self) -> str:
        return repr((self.name, sorted(self.signature.items()), sorted(self.constexprs.items(), key=repr),
                     sorted(self.attrs.items(), key=repr), sorted(vars(self.options).items(), key=repr)))


class _Pointer:
    """What Triton's binder reads from a tensor argument: dtype and alignment of its data pointer.

    Allocations are aligned far beyond 16 bytes, so a pointer's alignment is
    that of its storage offset.
    """

    def __init__(self, tensor):
        self.dtype = tensor.dtype
        self._offset = tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        return self._offset


class _DeviceView:
    """A meta tensor as :func:`uan_kernels.triton.geometry.tile_geometry` sees it: on CUDA device 0."""

    def __init__(self, tensor):
        import torch

        self.shape = tensor.shape
        self.device = torch.device("cuda", 0)
        self._strides = tensor.stride()

    def stride(self):
        return self._strides


@contextlib.contextmanager
def _gpu_geometry(geometry, gpu: Gpu = H100):
    """Make the launchers pick the block sizes and grid they pick on ``gpu``."""
    real_geometry, real_sm_count = geometry.tile_geometry, geometry._gpu_sm_count
    geometry.tile_geometry = lambda x3, components: real_geometry(_DeviceView(x3), components)
    geometry._gpu_sm_count = lambda device_index: gpu.sms
    try:
        yield
    finally:
        geometry.tile_geometry, geometry._gpu_sm_count = real_geometry, real_sm_count


def _import_compiling_triton():
    """The ``uan_kernels.triton`` package, imported to compile kernels (not to interpret them)."""
    import uan_kernels.triton
    from uan_kernels.triton import interpreter

    if interpreter.INTERPRETED:
        raise RuntimeError("uan_kernels.triton was imported under TRITON_INTERPRET=1; run the census in a "
                           "fresh process without it")
    return uan_kernels.triton


def capture_triton_launches(case: Case) -> Dict[Tuple[str, str], List[TritonLaunch]]:
    """Launches of the train forward, backward (both update modes) and eval forward of ``case``.

    Keyed by (phase, update): ("forward", ""), ("backward", "weight"),
    ("backward", "moving_average"), ("eval", ""). Float32 parameters (for
    bfloat16 input too), affine weight and bias, as a UAN layer has them.
    """
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    uan_triton = _import_compiling_triton()
    if not hasattr(triton.runtime.jit.JITFunction, "_pack_args"):
        raise RuntimeError(f"Triton {triton.__version__}'s JIT has no _pack_args (the census needs Triton >= 3.5)")
    backend = make_backend(GPUTarget(*TRITON_TARGET))
    dtype = getattr(torch, case.dtype)
    launches: Dict[Tuple[str, str], List[TritonLaunch]] = {}
    phase: Tuple[str, str] = ("", "")

    def capture(kernel, *args, grid, warmup, **kwargs):
        # As JITFunction.run: the same options and binder, with pointers for tensors.
        args = [_Pointer(a) if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: _Pointer(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        kwargs["debug"] = kwargs.get("debug", kernel.debug) or triton.knobs.runtime.debug
        if hasattr(triton.knobs.compilation, "instrumentation_mode"):  # Triton >= 3.7
            kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
        launches.setdefault(phase, []).append(
            TritonLaunch(kernel, tuple(grid), dict(bound), signature, constexprs, attrs, options)
        )

    k, c = case.components, case.shape[1]
    meta = dict(device="meta")
    x = torch.empty(case.shape, dtype=dtype, **meta)
    if case.channels_last:
        x = x.to(memory_format=torch.channels_last)
    grad = torch.empty_like(x)
    mu, log_sigma = torch.empty(k, c, **meta), torch.empty(k, c, **meta)
    mix_logits, weight, bias = torch.empty(k, **meta), torch.empty(c, **meta), torch.empty(c, **meta)
    launchers = uan_triton.launch
    with _gpu_geometry(uan_triton.geometry), launch_counts.intercepted_launches(uan_triton.kernels, capture):
        phase = ("forward", "")
        _, mean, var, mass = launchers.launch_train_forward(x, mu, log_sigma, mix_logits, weight, bias, EPS)
        for update in UPDATES:
            # Autograd asks for the mixture gradients when mu, log_sigma, mix_logits are parameters.
            phase = ("backward", update)
            launchers.launch_backward(grad, x, mu, log_sigma, mix_logits, weight, mean, var, mass, EPS,
                                      update == "weight")
        phase = ("eval", "")
        launchers.launch_eval_forward(x, mu, log_sigma, mix_logits, mean, var, weight, bias, EPS)
    return launches


@dataclass
class CompiledTriton:
    function: Function
    resources: Resources
    dynamic_shared: int
    num_warps: int


def compile_triton(launch: TritonLaunch, workdir: Path) -> CompiledTriton:
    """``triton.compile`` for sm_90, keeping ptxas' resource report (Triton discards it otherwise)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(launch.kernel, launch.signature, launch.constexprs, launch.attrs)
    knobs = triton.knobs
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    # Always compile, so that ptxas runs (and reports) even when Triton's cache has the kernel.
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget(*TRITON_TARGET), options=vars(launch.options))
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    cubin = workdir / f"{launch.name}_{hashlib.sha1(launch.key().encode()).hexdigest()[:12]}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    functions = disassemble(cubin)
    name = compiled.metadata.name
    resources = parse_ptxas_log(log.getvalue())
    if name not in functions or name not in resources:
        raise RuntimeError(f"no SASS or ptxas report for {name}")
    return CompiledTriton(functions[name], resources[name], compiled.metadata.shared, compiled.metadata.num_warps)


# Each finalize kernel (O(K*C) work) is listed with the pass whose sums it turns into results.
_TRITON_PASSES = {
    ("forward", "_stats_partials_kernel"): "statistics",
    ("forward", "_stats_finalize_kernel"): "statistics",
    ("forward", "_normalize_kernel"): "normalize",
    ("backward", "_backward_reduce_kernel"): "backward reduce",
    ("backward", "_statistic_gradients_kernel"): "backward reduce",
    ("backward", "_backward_elementwise_kernel"): "backward elementwise",
    ("backward", "_mixture_gradients_kernel"): "backward elementwise",
    ("eval", "_normalize_kernel"): "eval",
}


def triton_rows(case: Case, workdir: Path, cache: Dict[str, CompiledTriton]) -> List[KernelResult]:
    """Every kernel the Triton launchers run for ``case``, compiled and counted."""
    rows = []
    launches = capture_triton_launches(case)
    seen = set()
    for (phase, update), phase_launches in launches.items():
        for launch in phase_launches:
            pass_name = _TRITON_PASSES.get((phase, launch.name), phase)
            # The forward's backward-independent kernels are listed once per update mode only
            # for the pass that differs (backward elementwise).
            row_update = update if pass_name == "backward elementwise" else ""
            if (pass_name, row_update, launch.name) in seen:
                continue
            seen.add((pass_name, row_update, launch.name))
            rows.append(_triton_row(case, pass_name, row_update, launch, workdir, cache))
    return rows


def _triton_row(case: Case, pass_name: str, update: str, launch: TritonLaunch, workdir: Path,
                cache: Dict[str, CompiledTriton]) -> KernelResult:
    args = launch.arguments
    blocks = {k: args[k] for k in ("BLOCK_C", "BLOCK_N", "BLOCK_L") if k in args}
    described = ", ".join(f"{k}={v}" for k, v in blocks.items())
    row = KernelResult(case.backend, case.dtype, case.layout, case.components, shape_name(case.shape), pass_name,
                       update, launch.name, f"{described}, num_warps={launch.options.num_warps}, "
                       f"num_stages={launch.options.num_stages}, grid {launch.grid}",
                       per_element_kernel="BLOCK_L" in args)
    try:
        key = launch.key()
        if key not in cache:
            cache[key] = compile_triton(launch, workdir)
        compiled = cache[key]
        threads = 32 * compiled.num_warps
        _set_resources(row, compiled.resources, threads, compiled.dynamic_shared)
        if not row.per_element_kernel:
            return row
        _, iteration, overhead = _steady_state(_flow(compiled.function), _never)
        tile = blocks["BLOCK_C"] * blocks["BLOCK_N"] * blocks["BLOCK_L"]
        channel_tiles, programs = launch.grid[0], launch.grid[1]
        tiles = args["num_m_tiles"] * channel_tiles
        row.iteration_instructions = iteration.instructions
        row.element_loop_instructions = sum(inner.instructions for _, inner in iteration.inner)
        row.elements_per_thread_per_iteration = tile / threads
        per_iteration = iteration.instructions + row.element_loop_instructions
        row.instructions_per_element = per_iteration * threads * tiles / case.elements
        row.overhead_instructions = overhead.instructions
        row.elements_per_thread_per_block = args["tiles_per_program"] * tile / threads
        row.overhead_per_element = overhead.instructions * threads * programs * channel_tiles / case.elements
        row.notes = _notes(iteration)
        if iteration.inner:
            row.notes.append("loops inside the tile loop counted once per tile")
    except Exception as err:  # a compile error of one kernel must not hide the others
        row.error = f"{type(err).__name__}: {str(err)[:2000]}"
    return row


# --------------------------------------------------------------------------- #
# Sums per pass and step, launch counts
# --------------------------------------------------------------------------- #


@dataclass
class CaseSummary:
    backend: str
    dtype: str
    layout: str
    components: int
    shape: str
    passes: Dict[str, float]  # steady-state instructions per element, per pass ("backward elementwise <update>")
    passes_with_overhead: Dict[str, float]
    train_step: Dict[str, float]  # per update mode
    train_step_with_overhead: Dict[str, float]
    eval_forward: float
    eval_forward_with_overhead: float
    budget_train_step: float
    budget_eval_forward: float
    max_registers: int
    spills: bool
    errors: int


def _pass_key(pass_name: str, update: str) -> str:
    return f"{pass_name} ({update})" if update else pass_name


def summarise(case: Case, rows: List[KernelResult]) -> CaseSummary:
    steady: Dict[str, float] = {}
    total: Dict[str, float] = {}
    for row in rows:
        if row.per_element_kernel and not row.error:
            key = _pass_key(row.pass_name, row.update)
            steady[key] = steady.get(key, 0.0) + row.instructions_per_element
            total[key] = total.get(key, 0.0) + row.instructions_per_element + row.overhead_per_element

    def step(values: Dict[str, float], update: str) -> float:
        names = [p for p in TRAIN_PASSES if p != "backward elementwise"] + [_pass_key("backward elementwise", update)]
        return sum(values.get(n, math.nan) for n in names)

    train_bytes = sum(PASS_TRAFFIC[p] for p in TRAIN_PASSES) * case.itemsize
    return CaseSummary(
        case.backend, case.dtype, case.layout, case.components, shape_name(case.shape),
        steady, total,
        {u: step(steady, u) for u in UPDATES}, {u: step(total, u) for u in UPDATES},
        steady.get("eval", math.nan), total.get("eval", math.nan),
        H100.budget(train_bytes), H100.budget(PASS_TRAFFIC["eval"] * case.itemsize),
        max((r.registers for r in rows), default=0), any(r.spills for r in rows), sum(bool(r.error) for r in rows),
    )


# Kernels of the fused operators outside the passes: uan::moving_average_update_
# (moving_average_kernel, one block) after each training forward of update="moving_average".
CUDA_UPDATE_KERNELS = {"train moving_average": 1}


def fused_operator_kernels(backend: str) -> Dict[str, int]:
    """CUDA kernels inside the uan:: operators a backend calls, per launch-count phase.

    The C++ backend's passes (:func:`cuda_pass_kernels`); the Triton backend
    calls only uan::moving_average_update_ (its own kernels are counted directly).
    """
    return cuda_pass_kernels() if backend == "cpp" else dict(CUDA_UPDATE_KERNELS)


def cuda_pass_kernels() -> Dict[str, int]:
    """Kernels the CUDA build launches inside the fused operators, per launch-count phase."""
    kernels: Dict[str, int] = dict(CUDA_UPDATE_KERNELS)
    for pass_name, update, _, _, finalize in CUDA_PASSES:
        count = 1 + bool(finalize)  # element_pass, and its finalize kernel
        phases = [f"eval {u}" for u in UPDATES] if pass_name == "eval" else (
            [f"train {update}"] if update else [f"train {u}" for u in UPDATES])
        for phase in phases:
            kernels[phase] = kernels.get(phase, 0) + count
    return kernels


def measure_launch_counts() -> Dict:
    """:mod:`launch_counts` in a child process (Triton's host code runs CPU tensors only when interpreted)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("launch_counts.py"))],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    counts = json.loads(result.stdout)
    for backend, phases in counts.items():
        if isinstance(phases, dict):
            for phase, kernels in fused_operator_kernels(backend).items():
                phases[phase]["cuda_pass_kernels"] = kernels
    return counts


# --------------------------------------------------------------------------- #
# Output
# --------------------------------------------------------------------------- #

METHOD = [
    "Instructions are SASS instructions per element, counted statically from an offline sm_90 compile "
    "(nvdisasm) along one path through each kernel's steady-state loop (the innermost loop issuing global "
    "loads): launch-flag branches follow the case's flags, branches around nested loops take the loop, "
    "division slow paths and warp-divergence fallbacks are not taken; any other branch (lane-dependent, e.g. the "
    "lane-0 stores of reductions) counts both sides, as a diverged warp issues both, and the notes say so. "
    "Predicated-off instructions count (they are issued).",
    "CUDA element_pass: per element = the unrolled iteration / E, E = 16 B / itemsize elements per thread "
    "per iteration (4 where that is more and E x K > 32); the branch to a slice's last, partial group follows the full "
    "group (steady state). Triton: per element = iteration x threads x tiles / "
    "(N C L), masked lanes of partial tiles included.",
    "'+ overhead' adds each block's (CUDA unit's, Triton program's) prologue and epilogue outside the loop, "
    "roughly a lower bound (loops there count one iteration), amortised over the elements each thread handles "
    "per block.",
    "CUDA launch configurations (vector or scalar access, block shape, slices, grid) are decided by host code "
    "that needs a GPU; census.cuda_launch mirrors csrc/cuda/uan_passes.cuh's run_pass and launch_shape. Triton "
    "block sizes and grids come from running the real launchers (tile geometry for 132 SMs).",
    "Per-channel kernels (CUDA finalize_*, the Triton finalize kernels) are listed for their "
    "resources and launches, not counted per element.",
]


def _fmt(value: float) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.0f}"


def gpu_launches(count: Dict) -> int:
    """Kernel launches of a phase on a GPU: ATen ops, Triton kernels and the fused operators' CUDA kernels."""
    return count["aten_ops"] + count["triton_kernels"] + count.get("cuda_pass_kernels", 0)


def _launch_table(counts: Dict) -> List[str]:
    if not counts:
        return ["Not measured (--no-launch-counts)."]
    if "error" in counts:
        return [f"Launch counts unavailable: {counts['error']}"]
    lines = [
        "| backend | phase | ATen ops | fused operators | Triton kernels | CUDA kernels in fused operators "
        "| launches on a GPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for backend, phases in counts.items():
        if isinstance(phases, str):
            lines.append(f"| {backend} | unavailable: {phases} | | | | | |")
            continue
        for phase, c in phases.items():
            cuda = c.get("cuda_pass_kernels")
            lines.append(f"| {backend} | {phase} | {c['aten_ops']} | {c['fused_ops']} | {c['triton_kernels']} | "
                         f"{'-' if cuda is None else cuda} | {gpu_launches(c)} |")
    return lines


def format_markdown(kernels: List[KernelResult], cases: List[CaseSummary], counts: Dict, seconds: float) -> str:
    lines = ["# Instruction census", "", "## Budget at the memory floor", ""]
    lines += [f"- {line}" for line in budget_lines()]
    lines += ["", "## Method", ""] + [f"- {line}" for line in METHOD]
    lines += ["", "## Launches per training step / eval forward (CPU profiler, K=3)", ""]
    lines += _launch_table(counts)
    lines += [
        "", "ATen ops: leaf ops that do work (each is at least one kernel on a GPU). Fused operators: uan::* "
        "calls. CUDA kernels in fused operators: element passes plus finalize kernels of a CUDA build (not visible "
        "on CPU; from census.CUDA_PASSES).",
        "", "## Instructions per element, per pass and per step", "",
        "Steady state / with per-block overhead. W: update='weight', MA: update='moving_average'.", "",
        "| backend | dtype | layout | K | shape | statistics | normalize | bwd reduce | bwd elementwise W / MA | "
        "train step W / MA | budget step | eval | budget eval | max regs | spills |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def both(summary, key):
        return f"{_fmt(summary.passes.get(key))} / {_fmt(summary.passes_with_overhead.get(key))}"

    for s in cases:
        elementwise = " ; ".join(both(s, _pass_key("backward elementwise", u)) for u in UPDATES)
        step = " ; ".join(f"{_fmt(s.train_step[u])} / {_fmt(s.train_step_with_overhead[u])}" for u in UPDATES)
        lines.append(
            f"| {s.backend} | {s.dtype} | {s.layout} | {s.components} | {s.shape} | {both(s, 'statistics')} | "
            f"{both(s, 'normalize')} | {both(s, 'backward reduce')} | {elementwise} | {step} | "
            f"{_fmt(s.budget_train_step)} | {_fmt(s.eval_forward)} / {_fmt(s.eval_forward_with_overhead)} | "
            f"{_fmt(s.budget_eval_forward)} | {s.max_registers} | {'yes' if s.spills else 'no'}"
            f"{f' ({s.errors} errors)' if s.errors else ''} |"
        )
    lines += [
        "", "## Kernels", "",
        "| backend | dtype | layout | K | shape | pass | kernel | launch | regs | spill st/ld B | stack B | smem B | "
        "occupancy | instr/iteration (+ element loop) | elem/thread/iteration | instr/elem | overhead/thread | "
        "elem/thread/block | + overhead/elem | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in kernels:
        name = _pass_key(r.pass_name, r.update)
        if r.error:
            lines.append(f"| {r.backend} | {r.dtype} | {r.layout} | {r.components} | {r.shape} | {name} | {r.kernel} "
                         f"| {r.launch} | ERROR: {r.error.splitlines()[0][:200]} |" + " |" * 11)
            continue
        occupancy_text = f"{r.occupancy:.0%} ({r.blocks_per_sm} blocks, {r.occupancy_limiter})"
        counted = r.per_element_kernel
        loop = str(r.iteration_instructions)
        if r.element_loop_instructions:
            loop += f" + {r.element_loop_instructions}"
        lines.append(
            f"| {r.backend} | {r.dtype} | {r.layout} | {r.components} | {r.shape} | {name} | {r.kernel} | {r.launch} | "
            f"{r.registers} | {r.spill_stores}/{r.spill_loads} | {r.stack_bytes} | {r.shared_bytes} | "
            f"{occupancy_text} | {loop if counted else '-'} | "
            f"{f'{r.elements_per_thread_per_iteration:g}' if counted else '-'} | "
            f"{f'{r.instructions_per_element:.1f}' if counted else '-'} | "
            f"{r.overhead_instructions if counted else '-'} | "
            f"{f'{r.elements_per_thread_per_block:.1f}' if counted else '-'} | "
            f"{f'{r.overhead_per_element:.1f}' if counted else '-'} | {'; '.join(r.notes)} |"
        )
    lines += ["", f"Census took {seconds:.0f} s."]
    return "\n".join(lines) + "\n"


def toolchain() -> Dict[str, str]:
    import torch
    import triton

    return {
        "nvcc": _tool_version(["nvcc", "--version"]),
        "nvdisasm": _tool_version([nvdisasm_path(), "--version"]),
        "triton_ptxas": _tool_version([_triton_tool("ptxas") or "ptxas", "--version"]),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }


# --------------------------------------------------------------------------- #
# Main
# --------------------------------------------------------------------------- #


def _parse_shape(text: str) -> Tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 256x128x36x36, got {text!r}") from None
    if len(shape) != 4:
        raise argparse.ArgumentTypeError(f"shape must have 4 dims (N, C, H, W), got {text!r}")
    return shape


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--components", nargs="+", type=int, default=list(COMPONENTS), metavar="K")
    parser.add_argument("--shapes", nargs="+", type=_parse_shape, default=list(SHAPES), metavar="NxCxHxW")
    parser.add_argument("--output-dir", type=Path, default=RESULTS,
                        help="where census.json and census.md go (default: benchmarks/results)")
    parser.add_argument("--no-launch-counts", action="store_true", help="skip the CPU profiler launch counts")
    parser.add_argument("--ci", action="store_true",
                        help=f"exit 1 on any compile or analysis error, or any spill at K <= "
                             f"{CI_MAX_SPILL_FREE_COMPONENTS}")
    return parser.parse_args(argv)


def run_census(args: argparse.Namespace) -> Tuple[List[KernelResult], List[CaseSummary], List[str]]:
    """Compile and count every case of the selected matrix; also returns fatal errors."""
    cases = [
        Case(b, d, l, k, tuple(s))
        for b in args.backends for d in args.dtypes for l in args.layouts for k in args.components for s in args.shapes
    ]
    kernels: List[KernelResult] = []
    summaries: List[CaseSummary] = []
    errors: List[str] = []
    triton_cache: Dict[str, CompiledTriton] = {}
    with tempfile.TemporaryDirectory(prefix="uan-census-") as tmp:
        workdir = Path(tmp)
        compiled_cuda: Optional[CompiledCuda] = None
        if "cuda" in args.backends:
            try:
                compiled_cuda = compile_cuda(workdir)
            except RuntimeError as err:
                errors.append(f"CUDA: {err}")
        for case in cases:
            if case.backend == "cuda":
                if compiled_cuda is None:
                    continue
                rows = cuda_rows(case, compiled_cuda)
            else:
                try:
                    rows = triton_rows(case, workdir, triton_cache)
                except Exception as err:  # the launchers themselves failed for this case
                    errors.append(f"{case.label()}: {type(err).__name__}: {err}")
                    continue
            print(f"census: {case.label()}", file=sys.stderr)
            kernels += rows
            summaries.append(summarise(case, rows))
    return kernels, summaries, errors


def ci_failures(kernels: Iterable[KernelResult], errors: Sequence[str]) -> List[str]:
    failures = list(errors)
    for r in kernels:
        where = f"{r.backend} {r.dtype} {r.layout} K={r.components} {r.shape} {r.kernel}"
        if r.error:
            failures.append(f"{where}: {r.error.splitlines()[0]}")
        elif r.spills and r.components <= CI_MAX_SPILL_FREE_COMPONENTS:
            failures.append(f"{where}: spills {r.spill_stores} B stores / {r.spill_loads} B loads")
    return failures


def main(argv: Optional[Sequence[str]] = None) -> int:
    # Triton kernels compile only when defined outside its interpreter.
    os.environ.pop("TRITON_INTERPRET", None)
    args = parse_args(argv)
    start = time.monotonic()
    kernels, summaries, errors = run_census(args)
    counts = {} if args.no_launch_counts else measure_launch_counts()
    seconds = time.monotonic() - start
    markdown = format_markdown(kernels, summaries, counts, seconds)
    print(markdown)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "gpu": dataclasses.asdict(H100),
        "budget": budget_lines(),
        "method": METHOD,
        "toolchain": toolchain(),
        "matrix": {"backends": args.backends, "dtypes": args.dtypes, "layouts": args.layouts,
                   "components": args.components, "shapes": [shape_name(s) for s in args.shapes]},
        "launch_counts": counts,
        "cases": [dataclasses.asdict(s) for s in summaries],
        "kernels": [dataclasses.asdict(k) for k in kernels],
        "errors": errors,
        "seconds": round(seconds, 1),
    }
    (args.output_dir / "census.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.output_dir / "census.md").write_text(markdown)
    for error in errors:
        print(f"census: {error}", file=sys.stderr)
    if args.ci:
        failures = ci_failures(kernels, errors)
        for failure in failures:
            print(f"census --ci: {failure}", file=sys.stderr)
        return 1 if failures else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
