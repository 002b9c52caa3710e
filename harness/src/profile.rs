//! Exact instruction profiles: which wasm functions execute the instructions the harness counts.
//!
//! [`instrument`] rewrites a module before it is compiled so that every function calls a host
//! hook on entry and before every exit (`return`, the end of its body, `return_call*`), and
//! every call of an imported (host) function is bracketed by the same hooks, so host functions
//! appear as frames of their own. Each hook is `i32.const <function index>; call <hook>`:
//! two instructions. The host keeps a shadow stack per VM, reads the store's remaining fuel at
//! every hook and gives the fuel spent since the previous hook, less the hook's own two
//! instructions, to the stack as it was ([`Recorder`]). The fuel wasmtime counts is exact (one
//! unit per instruction, `nop`, `drop`, `block`, `loop`, `end`, `else`, `return` and
//! `unreachable` free), so the counts are the same on every run and add up to the
//! instructions an uninstrumented module spends; the harness also takes the hooks' fuel out of
//! every callback's count, so a profiled run reports the same `instructions` as a plain one.
//!
//! A function's body is wrapped in a `block` of its result type so that branches to the
//! function's outermost label (which return without a `return` instruction) leave the block and
//! pass the exit hook. `block` and `end` cost no fuel, so the wrapping changes no count.
//!
//! The call of a host function is its frame's own instruction (its self count is the number of
//! calls); what the host does inside costs no wasm instructions, except guest functions it calls
//! back (`malloc` for a returned buffer), which appear under it. A `return_call` leaves the
//! caller's frame before the callee's starts, so its one instruction goes to the caller's
//! caller. A trap ends every frame of the callback; instructions after the last hook go to the
//! innermost frame at the time.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use wasm_encoder::reencode::{self, Reencode};
use wasmparser::{CompositeInnerType, ExternalKind, KnownCustom, Name, Operator, Payload, TypeRef};

use crate::harness::HarnessError;

/// The import module of the hooks the instrumented module calls.
pub const HOOK_MODULE: &str = "eastwest-harness:profile";
/// Instructions of one hook call: `i32.const`, `call`.
pub const HOOK_COST: u64 = 2;
/// The frame of instructions spent outside any function (none in a well-formed module).
pub const NO_FUNCTION: u32 = u32::MAX;

/// Which callbacks a profile counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProfileScope {
    /// Stream callbacks only: the same instructions as the streams' `instructions`.
    #[default]
    Streams,
    /// Also VM start, configuration and root-context callbacks (ticks, queues, HTTP call
    /// answers outside streams).
    Everything,
}

/// A module rewritten for profiling, and the display name of each of its functions (by the
/// original module's function index).
pub struct Instrumented {
    pub wasm: Vec<u8>,
    pub names: Vec<String>,
    /// Functions below this index are imports (host functions).
    pub imported_funcs: u32,
}

/// What a module says about its functions.
#[derive(Default)]
struct ModuleInfo {
    /// Results of each type (None: not a function type).
    type_results: Vec<Option<Vec<wasmparser::ValType>>>,
    /// Type index of every function, imports first.
    func_types: Vec<u32>,
    imported_funcs: u32,
    import_names: Vec<String>,
    export_names: HashMap<u32, String>,
    name_section: HashMap<u32, String>,
    types_in_section: u32,
    has_import_section: bool,
}

fn parse_error(e: impl std::fmt::Display) -> HarnessError {
    HarnessError(format!("bad module: {e}"))
}

fn module_info(wasm: &[u8]) -> Result<ModuleInfo, HarnessError> {
    let mut info = ModuleInfo::default();
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        match payload.map_err(parse_error)? {
            Payload::TypeSection(reader) => {
                for group in reader {
                    for sub_type in group.map_err(parse_error)?.into_types() {
                        info.types_in_section += 1;
                        info.type_results
                            .push(match &sub_type.composite_type.inner {
                                CompositeInnerType::Func(ty) => Some(ty.results().to_vec()),
                                _ => None,
                            });
                    }
                }
            }
            Payload::ImportSection(reader) => {
                info.has_import_section = true;
                for import in reader {
                    let import = import.map_err(parse_error)?;
                    if let TypeRef::Func(ty) = import.ty {
                        info.func_types.push(ty);
                        info.import_names.push(import.name.to_string());
                        info.imported_funcs += 1;
                    }
                }
            }
            Payload::FunctionSection(reader) => {
                for ty in reader {
                    info.func_types.push(ty.map_err(parse_error)?);
                }
            }
            Payload::ExportSection(reader) => {
                for export in reader {
                    let export = export.map_err(parse_error)?;
                    if export.kind == ExternalKind::Func {
                        info.export_names
                            .entry(export.index)
                            .or_insert_with(|| export.name.to_string());
                    }
                }
            }
            Payload::CustomSection(reader) => {
                if let KnownCustom::Name(names) = reader.as_known() {
                    // A malformed name section only costs the names.
                    for subsection in names.into_iter().flatten() {
                        if let Name::Function(map) = subsection {
                            for naming in map.into_iter().flatten() {
                                info.name_section
                                    .insert(naming.index, naming.name.to_string());
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(info)
}

/// A Rust symbol without its hash; anything else as it is.
pub fn demangle(name: &str) -> String {
    match rustc_demangle::try_demangle(name) {
        Ok(demangled) => format!("{demangled:#}"),
        Err(_) => name.to_string(),
    }
}

/// Display names: an import's name (the host function: `proxy_get_property`), else the name
/// section's (demangled), else an export's name, else `func[N]`; names shared by several functions get ` [func N]` appended; `;` (the folded
/// format's separator) becomes `,`.
fn display_names(info: &ModuleInfo) -> Vec<String> {
    let count = info.func_types.len();
    let mut names: Vec<String> = (0..count as u32)
        .map(|index| {
            let name = info
                .import_names
                .get(index as usize)
                .cloned()
                .or_else(|| info.name_section.get(&index).map(|name| demangle(name)))
                .or_else(|| info.export_names.get(&index).cloned())
                .unwrap_or_else(|| format!("func[{index}]"));
            name.replace(';', ",").replace(['\n', '\r', '\t'], " ")
        })
        .collect();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for name in &names {
        *seen.entry(name.clone()).or_default() += 1;
    }
    for (index, name) in names.iter_mut().enumerate() {
        if seen[name.as_str()] > 1 {
            name.push_str(&format!(" [func {index}]"));
        }
    }
    names
}

/// Rewrites a module (binary, or text) so that it reports function entries and exits to the
/// hooks of [`define`]; see the module documentation.
pub fn instrument(wasm: &[u8]) -> Result<Instrumented, HarnessError> {
    let binary = wat::parse_bytes(wasm).map_err(parse_error)?;
    let info = module_info(&binary)?;
    let names = display_names(&info);
    if info.func_types.len() as u32 == info.imported_funcs {
        // No function of its own: nothing to count.
        return Ok(Instrumented {
            wasm: binary.into_owned(),
            names,
            imported_funcs: info.imported_funcs,
        });
    }
    // Block types for bodies with several results: `[] -> results`, after the module's types.
    let mut multi_results: Vec<Vec<wasmparser::ValType>> = Vec::new();
    for ty in &info.func_types[info.imported_funcs as usize..] {
        if let Some(Some(results)) = info.type_results.get(*ty as usize) {
            if results.len() > 1 && !multi_results.contains(results) {
                multi_results.push(results.clone());
            }
        }
    }
    let mut rewriter = Rewriter {
        hook_type: info.types_in_section,
        multi_results,
        next_function: info.imported_funcs,
        imports_written: false,
        info: &info,
    };
    let mut module = wasm_encoder::Module::new();
    rewriter
        .parse_core_module(&mut module, wasmparser::Parser::new(0), &binary)
        .map_err(|e| HarnessError(format!("bad module: cannot instrument it: {e}")))?;
    Ok(Instrumented {
        wasm: module.finish(),
        names,
        imported_funcs: info.imported_funcs,
    })
}

struct Rewriter<'a> {
    info: &'a ModuleInfo,
    /// Type index of `(i32) -> ()`, appended to the type section.
    hook_type: u32,
    multi_results: Vec<Vec<wasmparser::ValType>>,
    /// Original index of the next function body.
    next_function: u32,
    imports_written: bool,
}

impl Rewriter<'_> {
    fn enter_hook(&self) -> u32 {
        self.info.imported_funcs
    }

    fn exit_hook(&self) -> u32 {
        self.info.imported_funcs + 1
    }

    fn add_hook_imports(&mut self, imports: &mut wasm_encoder::ImportSection) {
        let ty = wasm_encoder::EntityType::Function(self.hook_type);
        imports.import(HOOK_MODULE, "enter", ty);
        imports.import(HOOK_MODULE, "exit", ty);
        self.imports_written = true;
    }

    fn hook(&self, f: &mut wasm_encoder::Function, hook: u32, func: u32) {
        f.instruction(&wasm_encoder::Instruction::I32Const(func as i32));
        f.instruction(&wasm_encoder::Instruction::Call(hook));
    }
}

type ReencodeResult<T> = Result<T, reencode::Error<std::convert::Infallible>>;

impl Reencode for Rewriter<'_> {
    type Error = std::convert::Infallible;

    fn function_index(&mut self, func: u32) -> ReencodeResult<u32> {
        Ok(if func < self.info.imported_funcs {
            func
        } else {
            func + 2
        })
    }

    fn parse_type_section(
        &mut self,
        types: &mut wasm_encoder::TypeSection,
        section: wasmparser::TypeSectionReader<'_>,
    ) -> ReencodeResult<()> {
        reencode::utils::parse_type_section(self, types, section)?;
        types
            .ty()
            .function([wasm_encoder::ValType::I32], std::iter::empty());
        for results in self.multi_results.clone() {
            let results = results
                .into_iter()
                .map(|ty| self.val_type(ty))
                .collect::<ReencodeResult<Vec<_>>>()?;
            types.ty().function(std::iter::empty(), results);
        }
        Ok(())
    }

    fn parse_import_section(
        &mut self,
        imports: &mut wasm_encoder::ImportSection,
        section: wasmparser::ImportSectionReader<'_>,
    ) -> ReencodeResult<()> {
        reencode::utils::parse_import_section(self, imports, section)?;
        self.add_hook_imports(imports);
        Ok(())
    }

    fn intersperse_section_hook(
        &mut self,
        module: &mut wasm_encoder::Module,
        _after: Option<wasm_encoder::SectionId>,
        before: Option<wasm_encoder::SectionId>,
    ) -> ReencodeResult<()> {
        use wasm_encoder::SectionId;
        let past_imports = !matches!(before, Some(SectionId::Type | SectionId::Import));
        if !self.imports_written && !self.info.has_import_section && past_imports {
            let mut imports = wasm_encoder::ImportSection::new();
            self.add_hook_imports(&mut imports);
            module.section(&imports);
        }
        Ok(())
    }

    fn parse_custom_name_subsection(
        &mut self,
        names: &mut wasm_encoder::NameSection,
        section: Name<'_>,
    ) -> ReencodeResult<()> {
        // Label indices move with the added block: label names are dropped.
        if matches!(section, Name::Label(_)) {
            return Ok(());
        }
        reencode::utils::parse_custom_name_subsection(self, names, section)
    }

    fn parse_function_body(
        &mut self,
        code: &mut wasm_encoder::CodeSection,
        body: wasmparser::FunctionBody<'_>,
    ) -> ReencodeResult<()> {
        let index = self.next_function;
        self.next_function += 1;
        let results = self
            .info
            .func_types
            .get(index as usize)
            .and_then(|ty| self.info.type_results.get(*ty as usize))
            .cloned()
            .flatten()
            .unwrap_or_default();
        let block_type = match results.as_slice() {
            [] => wasm_encoder::BlockType::Empty,
            [one] => wasm_encoder::BlockType::Result(self.val_type(*one)?),
            several => {
                let position = self
                    .multi_results
                    .iter()
                    .position(|r| r.as_slice() == several)
                    .unwrap_or(0) as u32;
                wasm_encoder::BlockType::FunctionType(self.hook_type + 1 + position)
            }
        };
        let (enter, exit) = (self.enter_hook(), self.exit_hook());
        let mut f = self.new_function_with_parsed_locals(&body)?;
        self.hook(&mut f, enter, index);
        f.instruction(&wasm_encoder::Instruction::Block(block_type));
        let mut reader = body.get_operators_reader()?;
        while !reader.eof() {
            let op = reader.read()?;
            let last = reader.eof();
            match &op {
                Operator::End if last => {
                    // The body's own end: close the wrapping block, report the exit.
                    f.instruction(&wasm_encoder::Instruction::End);
                    self.hook(&mut f, exit, index);
                    f.instruction(&wasm_encoder::Instruction::End);
                    continue;
                }
                Operator::Return
                | Operator::ReturnCall { .. }
                | Operator::ReturnCallIndirect { .. }
                | Operator::ReturnCallRef { .. } => self.hook(&mut f, exit, index),
                Operator::Call { function_index } if *function_index < self.info.imported_funcs => {
                    let callee = *function_index;
                    self.hook(&mut f, enter, callee);
                    f.instruction(&wasm_encoder::Instruction::Call(callee));
                    self.hook(&mut f, exit, callee);
                    continue;
                }
                _ => {}
            }
            f.instruction(&self.instruction(op)?);
        }
        code.function(&f);
        Ok(())
    }
}

/// Defines the hooks an instrumented module imports. They do nothing in a VM without a
/// [`Recorder`].
pub fn define(linker: &mut wasmtime::Linker<crate::host::VmState>) -> anyhow::Result<()> {
    for (name, enter) in [("enter", true), ("exit", false)] {
        linker.func_wrap(
            HOOK_MODULE,
            name,
            move |caller: wasmtime::Caller<'_, crate::host::VmState>, func: i32| {
                let remaining = caller.get_fuel().unwrap_or(0);
                let mut caller = caller;
                if let Some(recorder) = caller.data_mut().profile.as_mut() {
                    recorder.hook(remaining, func as u32, enter);
                }
            },
        )?;
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct Node {
    func: u32,
    parent: u32,
    instructions: u64,
    calls: u64,
}

/// One VM's call tree with exact instructions per frame.
pub struct Recorder {
    imported_funcs: u32,
    nodes: Vec<Node>,
    children: HashMap<(u32, u32), u32>,
    current: u32,
    last_fuel: u64,
    hook_fuel: u64,
    recording: bool,
    callbacks: BTreeMap<String, CallbackCost>,
}

impl Recorder {
    /// A recorder for a module whose first `imported_funcs` functions are imports.
    pub fn new(imported_funcs: u32) -> Self {
        Recorder {
            imported_funcs,
            nodes: vec![Node {
                func: NO_FUNCTION,
                parent: 0,
                instructions: 0,
                calls: 0,
            }],
            children: HashMap::new(),
            current: 0,
            last_fuel: 0,
            hook_fuel: 0,
            recording: false,
            callbacks: BTreeMap::new(),
        }
    }

    /// A callback starts with `fuel`; `recording` says whether it counts.
    pub fn begin(&mut self, fuel: u64, recording: bool) {
        self.current = 0;
        self.last_fuel = fuel;
        self.hook_fuel = 0;
        self.recording = recording;
    }

    fn child(&mut self, func: u32) -> u32 {
        let parent = self.current;
        let nodes = &mut self.nodes;
        *self.children.entry((parent, func)).or_insert_with(|| {
            nodes.push(Node {
                func,
                parent,
                instructions: 0,
                calls: 0,
            });
            (nodes.len() - 1) as u32
        })
    }

    fn attribute(&mut self, spent: u64) {
        if !self.recording || spent == 0 {
            return;
        }
        if self.current == 0 {
            // Nothing runs outside a function; kept so that totals stay exact regardless.
            let node = self.child(NO_FUNCTION);
            self.nodes[node as usize].instructions += spent;
        } else {
            self.nodes[self.current as usize].instructions += spent;
        }
    }

    /// A hook: the instructions since the previous one (less the hook's) go to the current
    /// stack, then the stack moves. Wasmtime charges one instruction for entering a wasm
    /// function (spent before its entry hook runs): that one goes to the entered frame.
    pub fn hook(&mut self, remaining: u64, func: u32, enter: bool) {
        let spent = self.last_fuel.saturating_sub(remaining);
        self.last_fuel = remaining;
        let hook = HOOK_COST.min(spent);
        self.hook_fuel += hook;
        let spent = spent - hook;
        if enter {
            let entry = u64::from(func >= self.imported_funcs).min(spent);
            self.attribute(spent - entry);
            self.current = self.child(func);
            if self.recording {
                self.nodes[self.current as usize].calls += 1;
            }
            self.attribute(entry);
        } else {
            self.attribute(spent);
            // Pop to the frame that exits (frames above it left without a hook: none in an
            // instrumented module unless exceptions unwound them).
            let mut node = self.current;
            while node != 0 && self.nodes[node as usize].func != func {
                node = self.nodes[node as usize].parent;
            }
            if node != 0 {
                self.current = self.nodes[node as usize].parent;
            }
        }
    }

    /// The callback returned (or trapped) with `remaining` fuel: what was spent after the last
    /// hook goes to the innermost frame. Returns the fuel the hooks spent in the callback.
    pub fn end(&mut self, remaining: u64) -> u64 {
        let spent = self.last_fuel.saturating_sub(remaining);
        self.attribute(spent);
        self.last_fuel = remaining;
        self.current = 0;
        self.hook_fuel
    }

    /// Whether the current callback counts.
    pub fn recording(&self) -> bool {
        self.recording
    }

    /// Counts a callback's instructions (hooks excluded) by its name.
    pub fn count_callback(&mut self, name: &str, instructions: u64) {
        let cost = self.callbacks.entry(name.to_string()).or_default();
        cost.calls += 1;
        cost.instructions += instructions;
    }

    /// Forgets everything counted so far (after a warm-up).
    pub fn reset(&mut self) {
        *self = Recorder::new(self.imported_funcs);
    }

    /// Adds this VM's counts to `profile`.
    pub fn add_to(&self, names: &[String], profile: &mut Profile) {
        let name = |func: u32| {
            if func == NO_FUNCTION {
                "(no function)".to_string()
            } else {
                names
                    .get(func as usize)
                    .cloned()
                    .unwrap_or_else(|| format!("func[{func}]"))
            }
        };
        for (index, node) in self.nodes.iter().enumerate().skip(1) {
            if node.instructions == 0 && node.calls == 0 {
                continue;
            }
            let mut stack = Vec::new();
            let mut at = index as u32;
            while at != 0 {
                stack.push(name(self.nodes[at as usize].func));
                at = self.nodes[at as usize].parent;
            }
            stack.reverse();
            let cost = profile.stacks.entry(stack).or_default();
            cost.instructions += node.instructions;
            cost.calls += node.calls;
        }
        for (name, cost) in &self.callbacks {
            let total = profile.callbacks.entry(name.clone()).or_default();
            total.calls += cost.calls;
            total.instructions += cost.instructions;
        }
    }
}

/// Instructions of one stack's innermost frame, and how often that frame was entered there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackCost {
    pub instructions: u64,
    pub calls: u64,
}

/// How often a callback ran and its instructions (as the harness counts them per stream).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CallbackCost {
    pub calls: u64,
    pub instructions: u64,
}

/// One function's totals.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FunctionCost {
    pub name: String,
    /// Instructions of the function itself.
    pub self_instructions: u64,
    /// Instructions of the function and everything it called (recursion counted once).
    pub inclusive_instructions: u64,
    pub calls: u64,
}

/// An exact instruction profile: instructions by call stack (outermost frame first).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Profile {
    pub stacks: BTreeMap<Vec<String>, StackCost>,
    pub callbacks: BTreeMap<String, CallbackCost>,
}

impl Profile {
    /// Every instruction counted.
    pub fn total(&self) -> u64 {
        self.stacks.values().map(|cost| cost.instructions).sum()
    }

    /// Folded stacks (`frame;frame;frame count`, one stack a line, sorted), the input of
    /// flamegraph.pl, inferno-flamegraph and speedscope. Stacks that spent nothing are left out.
    pub fn folded(&self) -> String {
        let mut out = String::new();
        for (stack, cost) in &self.stacks {
            if cost.instructions > 0 {
                out.push_str(&stack.join(";"));
                out.push(' ');
                out.push_str(&cost.instructions.to_string());
                out.push('\n');
            }
        }
        out
    }

    /// Functions by self instructions (then inclusive, then name), highest first.
    pub fn functions(&self) -> Vec<FunctionCost> {
        let mut by_name: BTreeMap<&str, FunctionCost> = BTreeMap::new();
        for (stack, cost) in &self.stacks {
            let Some(last) = stack.last() else { continue };
            let entry = by_name
                .entry(last.as_str())
                .or_insert_with(|| FunctionCost {
                    name: last.clone(),
                    self_instructions: 0,
                    inclusive_instructions: 0,
                    calls: 0,
                });
            entry.self_instructions += cost.instructions;
            entry.calls += cost.calls;
            let distinct: BTreeSet<&str> = stack.iter().map(String::as_str).collect();
            for name in distinct {
                by_name
                    .entry(name)
                    .or_insert_with(|| FunctionCost {
                        name: name.to_string(),
                        self_instructions: 0,
                        inclusive_instructions: 0,
                        calls: 0,
                    })
                    .inclusive_instructions += cost.instructions;
            }
        }
        let mut functions: Vec<FunctionCost> = by_name.into_values().collect();
        functions.sort_by(|a, b| {
            b.self_instructions
                .cmp(&a.self_instructions)
                .then(b.inclusive_instructions.cmp(&a.inclusive_instructions))
                .then(a.name.cmp(&b.name))
        });
        functions
    }

    /// The `top` functions by self instructions as a table.
    pub fn table(&self, top: usize) -> String {
        let total = self.total().max(1) as f64;
        let share = |n: u64| format!("{:.1}%", n as f64 * 100.0 / total);
        let mut out = format!(
            "{:>10} {:>6} {:>10} {:>6} {:>7}  function\n",
            "self", "self%", "inclusive", "incl%", "calls"
        );
        for f in self.functions().into_iter().take(top) {
            out.push_str(&format!(
                "{:>10} {:>6} {:>10} {:>6} {:>7}  {}\n",
                f.self_instructions,
                share(f.self_instructions),
                f.inclusive_instructions,
                share(f.inclusive_instructions),
                f.calls,
                f.name
            ));
        }
        out
    }
}
