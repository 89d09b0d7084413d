#!/usr/bin/env python3
"""Rewrites a kernels/*.cu file as host C++ for the emulator (emulator.hpp).

Three rewrites: a kernel's launch bounds become a check of its block's size,
shared-memory arrays become arrays of the emulated block, each its exact size (so that
AddressSanitizer sees overruns) and counted against the GPU's limits, and every
launch, `kernel<<<grid, block, shared, stream>>>(args)` or `launch_chained(kernel,
grid, block, shared, stream, args)`, becomes a call that enqueues the kernel on the
emulated stream (where nothing runs early, the chained launch is an ordinary one).
Usage: translate.py IN.cu OUT.cpp
"""
import re
import sys


def shared_arrays(src):
    src = re.sub(r'extern __shared__ (\w+) (\w+)\[\];',
                 r'\1* \2 = reinterpret_cast<\1*>(emu::block().shared.data());', src)
    slot = [0]

    def view(type_, name, dims):
        slot[0] += 1
        return (f'auto& {name} = *reinterpret_cast<{type_}(*){dims}>('
                f'emu::static_shared({slot[0] - 1}, sizeof({type_}{dims})));')

    def declaration(m):  # "__shared__ T a[..][..], b[..], c;"
        return ' '.join(view(m.group(1), name, dims) for name, dims in re.findall(r'(\w+)((?:\[[^\]]+\])*)', m.group(2)))

    return re.sub(r'__shared__ (\w+) ([^;]+);', declaration, src)


def split_top_level(text):
    parts, depth, current = [], 0, ''
    for ch in text:
        depth += ch in '([{'
        depth -= ch in ')]}'
        if ch == ',' and depth == 0:
            parts.append(current.strip())
            current = ''
        else:
            current += ch
    return parts + [current.strip()]


def node_name(kernel, before):
    """The launch's name in a graph: a kernel template's instance as the compiler names
    it; a variable set to one of two kernels (`auto k = c ? a<1> : a<4>;`) as the one it
    holds at the launch."""
    if '<' in kernel:
        return f'emu::kernel_name<&{kernel}>()'
    choice = list(re.finditer(rf'auto {re.escape(kernel)} = [^;?]*\?\s*([^:;]+?)\s*:\s*([^;]+?);', before))
    if choice:
        first, second = choice[-1].groups()
        return f'({kernel} == {first} ? {node_name(first, "")} : {node_name(second, "")})'
    return f'"{kernel}"'


TEMPLATE_KERNELS = set()  # the file's kernel templates, by name


def kernel_key(kernel):
    """The launch's kernel as a pointer, which cudaFuncSetAttribute's opt-ins are kept by;
    null for a template whose arguments the launch deduces (no pointer names it)."""
    return 'nullptr' if kernel in TEMPLATE_KERNELS else f'emu::kernel_key({kernel})'


def enqueue(kernel, grid, block, shared, stream, args, before):
    name = node_name(kernel, before)
    return (f'emu::enqueue({stream}, [=] {{ emu::launch(dim3({grid}), dim3({block}), {shared}, '
            f'{kernel_key(kernel)}, {name}, [=] {{ {kernel}({args}); }}); }}, {name})')


def closing(src, open_at):
    """The index of the parenthesis that closes the one at open_at."""
    close, depth = open_at, 0
    while True:
        depth += src[close] == '('
        depth -= src[close] == ')'
        if depth == 0:
            return close
        close += 1


def chained_launches(src):
    out = ''
    while (m := re.search(r'\blaunch_chained\(', src)):
        close = closing(src, m.end() - 1)
        call = src[m.end():close]
        kernel = re.match(r'\s*([\w:]+(?:<[^()]*?>)?)\s*,', call)  # template arguments hold commas
        grid, block, shared, stream, *args = split_top_level(call[kernel.end():])
        kernel = kernel.group(1)
        # as many line breaks as the call had, so that the lines after it keep their numbers
        out += (src[:m.start()] + enqueue(kernel, grid, block, shared, stream, ', '.join(args), src[:m.start()]) +
                '\n' * call.count('\n'))
        src = src[close + 1:]
    return out + src


def launches(src):
    out = ''
    while (at := src.find('<<<')) >= 0:
        start, depth = at, 0  # back over the kernel's name and template arguments
        while start > 0:
            ch = src[start - 1]
            if ch == '>':
                depth += 1
            elif ch == '<':
                depth -= 1
            elif depth == 0 and not (ch.isalnum() or ch in '_:'):
                break
            start -= 1
        end_config = src.index('>>>', at)
        config = split_top_level(src[at + 3:end_config])
        assert src[end_config + 3] == '(', src[at:end_config + 20]
        close = closing(src, end_config + 3)
        shared = config[2] if len(config) > 2 else '0'
        stream = config[3] if len(config) > 3 else 'nullptr'
        out += src[:start] + enqueue(src[start:at], config[0], config[1], shared, stream,
                                     src[end_config + 4:close], src[:start])
        src = src[close + 1:]
    return out + src


def launch_bounds(src):
    """`__global__ void __launch_bounds__(max_threads, ...) kernel(...) {` becomes a check at
    the kernel's start that its block has at most max_threads threads: the GPU refuses
    a launch of more."""
    out = ''
    while (m := re.search(r'__launch_bounds__\(', src)):
        close = closing(src, m.end() - 1)
        max_threads = split_top_level(src[m.end():close])[0]
        body = src.index('{', close)
        kernel = re.match(r'\s*(\w+)\s*\(', src[close + 1:body]).group(1)
        out += src[:m.start()] + src[close + 1:body + 1] + f' emu::check_block_size({max_threads}, "{kernel}");'
        src = src[body + 1:]
    return out + src


def check_chained_kernels(src, source):
    """A file that launches by launch_chained starts each of its kernels with
    chain_after_prior_grids(): without that wait, a kernel launched early would race
    the one before it on the GPU, and nothing here would show it."""
    if not re.search(r'\blaunch_chained\(', src):
        return
    for m in re.finditer(r'__global__[^{;]*?(\w+)\s*\([^{;]*\)\s*\{\s*([^;]*;)', src):
        if m.group(2) != 'chain_after_prior_grids();':
            sys.exit(f'{source}: kernel {m.group(1)} does not start with chain_after_prior_grids()')


if __name__ == '__main__':
    source, target = sys.argv[1], sys.argv[2]
    with open(source) as f:
        text = f.read()
    check_chained_kernels(text, source)
    text = launch_bounds(text)
    TEMPLATE_KERNELS.update(re.findall(r'template\s*<[^{;]*?>\s*__global__[^{;(]*?(\w+)\s*\(', text))
    text = chained_launches(launches(shared_arrays(text)))
    with open(target, 'w') as f:
        f.write(f'// Generated from {source} by tests/emulator/translate.py.\n#line 1 "{source}"\n' + text)
