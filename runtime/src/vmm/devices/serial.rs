//! The 8250 UART at 0x3f8 (ttyS0): the guest console.
//!
//! Emulated with `vm-superio`. Output goes to a log file and into a small
//! ring of recent lines, so that when a guest dies the error can quote what
//! the kernel said last (a panic message, usually).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// First I/O port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// ISA IRQ of COM1.
pub const COM1_IRQ: u32 = 4;
/// Console lines kept in memory: enough for a whole oops (its registers,
/// code bytes and call trace) before the panic line. A clone's console is
/// quiet (`quiet`), so an idle pod holds next to none.
const RECENT_LINES: usize = 100;

/// Lines that begin a kernel oops or warning report (`BUG: unable to handle
/// page fault`, `Oops: 0002 [#1]`, a double fault, a `WARNING` under a
/// `cut here` line...): the report of a dead guest quotes from the first of
/// them, where the cause is, not only the last lines before the reset.
const OOPS_STARTS: &[&str] = &[
    "------------[ cut here ]------------",
    "BUG:",
    "Oops:",
    "general protection fault",
    "double fault",
    "kernel BUG at",
    "stack segment:",
    "invalid opcode:",
    "Kernel panic",
];

/// Raises the serial IRQ through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A console line that says how the guest kernel is ending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleNote {
    /// "Kernel panic - not syncing: ...": a reset follows (`panic=-1`).
    Panic,
    /// "reboot: System halted" or "reboot: Power down": the kernel is about
    /// to stop every CPU in HLT with interrupts off, which no VM exit
    /// reports, so this line is the only notice the host gets.
    Halt,
}

/// The note a whole console line carries, if any. A halt line must be the
/// kernel's own (optionally after its `[ seconds]` time stamp), so that an
/// agent log line quoting it does not stop the VM.
fn note_of(line: &str) -> Option<ConsoleNote> {
    if line.contains("Kernel panic") {
        return Some(ConsoleNote::Panic);
    }
    let text = after_time_stamp(line);
    // Without ACPI, `poweroff -f` prints "reboot: Power off not available:
    // System halted instead" (seen in the test host), `halt -f` "reboot:
    // System halted".
    match text.trim() {
        "reboot: System halted"
        | "reboot: Power down"
        | "reboot: Power off not available: System halted instead" => Some(ConsoleNote::Halt),
        _ => None,
    }
}

/// What the guest printed: kept whole in a file, the tail in memory.
#[derive(Default)]
pub struct ConsoleLog {
    recent: VecDeque<String>,
    partial: Vec<u8>,
    panicked: bool,
    halted: bool,
}

impl ConsoleLog {
    /// Adds output; returns the notes of the lines it completed.
    fn push(&mut self, bytes: &[u8]) -> Vec<ConsoleNote> {
        let mut notes = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.partial)
                    .trim_end_matches('\r')
                    .to_string();
                self.partial.clear();
                let note = note_of(&line);
                match note {
                    Some(ConsoleNote::Panic) => self.panicked = true,
                    Some(ConsoleNote::Halt) => self.halted = true,
                    None => {}
                }
                notes.extend(note);
                if self.recent.len() == RECENT_LINES {
                    self.recent.pop_front();
                }
                self.recent.push_back(line);
            } else if self.partial.len() < 4096 {
                self.partial.push(b);
            }
        }
        notes
    }

    /// The last lines the guest printed, oldest first.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let partial =
            (!self.partial.is_empty()).then(|| String::from_utf8_lossy(&self.partial).into_owned());
        let whole = n.saturating_sub(usize::from(partial.is_some()));
        let mut out: Vec<String> = self
            .recent
            .iter()
            .skip(self.recent.len().saturating_sub(whole))
            .cloned()
            .collect();
        out.extend(partial);
        out
    }

    /// What to quote about a guest that died: from the first line of the
    /// earliest kernel oops still kept (at most `max` lines), else the last
    /// `tail` lines.
    pub fn report(&self, tail: usize, max: usize) -> Vec<String> {
        match self.recent.iter().position(|l| {
            OOPS_STARTS
                .iter()
                .any(|s| after_time_stamp(l).starts_with(s))
        }) {
            Some(first) => {
                let mut all = self.tail(self.recent.len() + 1);
                all.drain(..first);
                all.truncate(max);
                all
            }
            None => self.tail(tail),
        }
    }

    /// Whether the guest kernel printed a panic message.
    pub fn panicked(&self) -> bool {
        self.panicked
    }

    /// Whether the guest kernel said it halted or powered off.
    pub fn halted(&self) -> bool {
        self.halted
    }
}

/// A kernel line without its `[ seconds]` time stamp.
fn after_time_stamp(line: &str) -> &str {
    match line.strip_prefix('[') {
        Some(rest) => rest
            .split_once(']')
            .map_or(line, |(_, after)| after)
            .trim_start(),
        None => line,
    }
}

/// Called (on a vCPU thread) for each [`ConsoleNote`] line.
pub type ConsoleObserver = Box<dyn Fn(ConsoleNote) + Send>;

/// The writer behind the UART: the log file plus the shared [`ConsoleLog`].
pub struct ConsoleSink {
    file: Option<File>,
    log: Arc<Mutex<ConsoleLog>>,
    observer: Option<ConsoleObserver>,
}

impl ConsoleSink {
    pub fn new(file: Option<File>, log: Arc<Mutex<ConsoleLog>>) -> Self {
        Self {
            file,
            log,
            observer: None,
        }
    }

    /// Calls `observer` for every panic or halt line the guest prints.
    pub fn with_observer(mut self, observer: ConsoleObserver) -> Self {
        self.observer = Some(observer);
        self
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(f) = self.file.as_mut() {
            // A full disk must not stop the guest; the ring still has the tail.
            let _ = f.write_all(buf);
        }
        let notes = match self.log.lock() {
            Ok(mut log) => log.push(buf),
            Err(_) => Vec::new(),
        };
        // Outside the log's lock: the observer may stop the VM.
        if let Some(observe) = &self.observer {
            for n in notes {
                observe(n);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub type SerialDevice = Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleSink>;

/// COM1 as the vCPU threads see it: port I/O in, register access out.
pub struct Com1 {
    serial: Mutex<SerialDevice>,
}

/// The UART registers, saved with a template (vm-superio's `SerialState`
/// has no serde support).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Com1State {
    pub regs: [u8; 9],
    pub in_buffer: Vec<u8>,
}

impl Com1 {
    /// Restores a UART saved by [`Com1::save`].
    pub fn restore(irq: EventFd, sink: ConsoleSink, saved: &Com1State) -> io::Result<Self> {
        let r = saved.regs;
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: saved.in_buffer.clone(),
        };
        let serial =
            Serial::from_state(&state, IrqTrigger(irq), vm_superio::serial::NoEvents, sink)
                .map_err(|e| io::Error::other(format!("serial state: {e:?}")))?;
        Ok(Self {
            serial: Mutex::new(serial),
        })
    }

    pub fn save(&self) -> Com1State {
        let s = self.serial.lock().unwrap().state();
        Com1State {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    pub fn new(irq: EventFd, sink: ConsoleSink) -> Self {
        Self {
            serial: Mutex::new(Serial::new(IrqTrigger(irq), sink)),
        }
    }

    /// Handles an access if `port` belongs to COM1; returns false otherwise.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        if !(COM1_BASE..COM1_BASE + 8).contains(&port) || data.len() != 1 {
            return false;
        }
        data[0] = self.serial.lock().unwrap().read((port - COM1_BASE) as u8);
        true
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        if !(COM1_BASE..COM1_BASE + 8).contains(&port) || data.len() != 1 {
            return false;
        }
        if let Err(e) = self
            .serial
            .lock()
            .unwrap()
            .write((port - COM1_BASE) as u8, data[0])
        {
            log::debug!("serial write: {e:?}");
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_log_keeps_the_tail_and_spots_a_panic() {
        let mut log = ConsoleLog::default();
        for i in 0..100 {
            log.push(format!("line {i}\r\n").as_bytes());
        }
        log.push(b"Kernel panic - not syncing: Attempted to kill init!\n[ end");
        let tail = log.tail(3);
        assert_eq!(
            tail,
            vec![
                "line 99",
                "Kernel panic - not syncing: Attempted to kill init!",
                "[ end"
            ]
        );
        assert!(log.panicked());
        assert!(!log.halted());
    }

    #[test]
    fn a_report_quotes_the_oops_from_its_first_line() {
        let mut log = ConsoleLog::default();
        for i in 0..20 {
            log.push(format!("[    1.{i:06}] boot line {i}\n").as_bytes());
        }
        log.push(
            b"[   39.000001] BUG: unable to handle page fault for address: fffffe0000001ff8\n",
        );
        for i in 0..30 {
            log.push(format!("[   39.1{i:05}] register line {i}\n").as_bytes());
        }
        log.push(b"[   39.3] Kernel panic - not syncing: Fatal exception in interrupt\n");
        let report = log.report(5, 100);
        assert_eq!(report.len(), 32);
        assert!(
            report[0].ends_with("BUG: unable to handle page fault for address: fffffe0000001ff8")
        );
        assert!(report[31].ends_with("Fatal exception in interrupt"));
        // Capped at `max` lines, from the start of the oops.
        assert_eq!(log.report(5, 3)[0], report[0]);
        assert_eq!(log.report(5, 3).len(), 3);

        // No oops: the tail.
        let mut quiet = ConsoleLog::default();
        for i in 0..20 {
            quiet.push(format!("line {i}\n").as_bytes());
        }
        assert_eq!(quiet.report(2, 100), vec!["line 18", "line 19"]);
    }

    #[test]
    fn halt_and_power_down_lines_are_noted_only_when_the_kernel_prints_them() {
        for (line, note) in [
            (
                "[   12.345678] reboot: System halted",
                Some(ConsoleNote::Halt),
            ),
            ("[    1.000000] reboot: Power down", Some(ConsoleNote::Halt)),
            ("reboot: System halted", Some(ConsoleNote::Halt)),
            (
                "[    9.634794] reboot: Power off not available: System halted instead",
                Some(ConsoleNote::Halt),
            ),
            (
                "[    2.5] Kernel panic - not syncing: Out of memory",
                Some(ConsoleNote::Panic),
            ),
            ("[    3.000000] reboot: Restarting system", None),
            ("jevm-agent: error: exec: reboot: System halted", None),
            ("[ 1.0] echo reboot: Power down", None),
            ("[ unterminated reboot: System halted", None),
            ("", None),
        ] {
            assert_eq!(note_of(line), note, "{line:?}");
        }
    }

    #[test]
    fn the_sink_tells_its_observer_once_per_line_even_when_bytes_trickle_in() {
        let log = Arc::new(Mutex::new(ConsoleLog::default()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let mut sink = ConsoleSink::new(None, log.clone())
            .with_observer(Box::new(move |n| s2.lock().unwrap().push(n)));
        // The UART hands over one byte per port write.
        for b in b"[    9.1] reboot: System hal" {
            sink.write_all(&[*b]).unwrap();
        }
        assert!(seen.lock().unwrap().is_empty(), "noted before the newline");
        sink.write_all(b"ted\r\nnext\n").unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![ConsoleNote::Halt]);
        assert!(log.lock().unwrap().halted());
        assert_eq!(
            log.lock().unwrap().tail(2),
            vec!["[    9.1] reboot: System halted", "next"]
        );
    }
}
