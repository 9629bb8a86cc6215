//! Routes the guest's port and MMIO accesses to the device that owns them.

use std::sync::Mutex;

use super::devices::mmio::MmioTransport;
use super::devices::serial::Com1;
use super::layout::MMIO_SIZE;

/// i8042 command port: writing 0xfe there is the classic keyboard-controller
/// reset, which some reboot paths use.
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

#[derive(Debug, PartialEq, Eq)]
pub enum PioOutcome {
    Done,
    Reset,
}

pub struct Bus {
    pub com1: Com1,
    /// virtio-mmio devices, each with its base address.
    pub mmio: Vec<(u64, Mutex<MmioTransport>)>,
}

impl Bus {
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if !self.com1.pio_read(port, data) {
            // Nothing there: what an empty ISA bus reads as.
            data.fill(0xff);
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) -> PioOutcome {
        if port == I8042_COMMAND && data == [I8042_RESET] {
            return PioOutcome::Reset;
        }
        self.com1.pio_write(port, data);
        PioOutcome::Done
    }

    fn find(&self, addr: u64) -> Option<(&Mutex<MmioTransport>, u64)> {
        self.mmio
            .iter()
            .find(|(base, _)| (*base..*base + MMIO_SIZE).contains(&addr))
            .map(|(base, dev)| (dev, addr - base))
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((dev, offset)) => dev.lock().unwrap().read(offset, data),
            None => data.fill(0xff),
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((dev, offset)) = self.find(addr) {
            dev.lock().unwrap().write(offset, data);
        }
    }
}
