//! The Intel MultiProcessor table: how an ACPI-less guest learns its CPUs,
//! its IO-APIC and the ISA interrupt routing.
//!
//! Every vCPU must be listed (a table with one CPU gives the guest one CPU).

use vm_memory::{Bytes, GuestAddress};

use super::devices::GuestMemory;
use super::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR, IOAPIC_PINS};

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const CPU_ENTRY_LEN: usize = 20;
const SMALL_ENTRY_LEN: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs do not fit in the MP table (at most 254)")]
    TooManyCpus(u8),
    #[error("cannot write the MP table into guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the table bytes for `cpus` vCPUs (APIC IDs 0..cpus) placed at `base`.
fn build(cpus: u8, base: u32) -> Vec<u8> {
    let ioapic_id = cpus; // the first ID after the CPUs
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let mut e = [0u8; CPU_ENTRY_LEN];
        e[0] = 0; // processor
        e[1] = id;
        e[2] = 0x14; // local APIC version
        e[3] = 1 | if id == 0 { 2 } else { 0 }; // enabled, bootstrap
        e[4..8].copy_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        e[8..12].copy_from_slice(&0x201u32.to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&e);
        count += 1;
    }
    // bus 0: ISA
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    // the IO-APIC
    let mut e = [0u8; SMALL_ENTRY_LEN];
    e[0] = 2;
    e[1] = ioapic_id;
    e[2] = 0x11;
    e[3] = 1; // usable
    e[4..8].copy_from_slice(&IOAPIC_ADDR.to_le_bytes());
    entries.extend_from_slice(&e);
    count += 1;
    // ISA IRQ n -> IO-APIC pin n, conforming polarity/trigger (edge, high)
    for pin in 0..IOAPIC_PINS as u8 {
        entries.extend_from_slice(&[3, 0, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // LINT0 = ExtINT (the PIC), LINT1 = NMI, on every local APIC
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = base + FLOATING_LEN as u32;
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(b"PCMP");
    header[4..6].copy_from_slice(&((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    header[6] = 4; // spec 1.4
    header[8..16].copy_from_slice(b"JEVM    ");
    header[16..28].copy_from_slice(b"MICROVM     ");
    header[34..36].copy_from_slice(&count.to_le_bytes());
    header[36..40].copy_from_slice(&APIC_ADDR.to_le_bytes());
    let mut table = header.to_vec();
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = [0u8; FLOATING_LEN];
    floating[0..4].copy_from_slice(b"_MP_");
    floating[4..8].copy_from_slice(&table_addr.to_le_bytes());
    floating[8] = 1; // length in 16-byte units
    floating[9] = 4;
    floating[10] = checksum(&floating);

    let mut out = floating.to_vec();
    out.extend_from_slice(&table);
    out
}

/// Writes the MP table for `cpus` vCPUs at the start of the EBDA.
pub fn write(mem: &GuestMemory, cpus: u8) -> Result<(), MpTableError> {
    if cpus == 0 || cpus > 254 {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    let bytes = build(cpus, EBDA_START as u32);
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn table_checksums_are_zero_and_every_cpu_is_listed() {
        let t = build(3, EBDA_START as u32);
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        let len = u16::from_le_bytes([t[20], t[21]]) as usize;
        assert_eq!(&t[16..20], b"PCMP");
        assert_eq!(sum(&t[16..16 + len]), 0);
        assert_eq!(16 + len, t.len());
        let cpus = t[16 + HEADER_LEN..]
            .chunks(CPU_ENTRY_LEN)
            .take(3)
            .filter(|e| e[0] == 0)
            .count();
        assert_eq!(cpus, 3);
        // the BSP flag is on CPU 0 only
        assert_eq!(t[16 + HEADER_LEN + 3], 3);
        assert_eq!(t[16 + HEADER_LEN + CPU_ENTRY_LEN + 3], 1);
    }
}
