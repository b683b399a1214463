//! What differs between the XDP and TC hooks, and bounds-checked access to
//! the frame. Only direct packet access: the program must load on kernels
//! from 5.15, which lack `bpf_xdp_load_bytes`/`bpf_xdp_store_bytes` (5.18).

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::generated as h,
    programs::{TcContext, XdpContext},
};

/// Why resizing failed.
pub enum ResizeError {
    /// The frame is as it was: the query may still be passed on.
    Untouched,
    /// The frame was changed: it must be dropped.
    Touched,
}

pub trait Packet {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Total frame length from the Ethernet header on.
    fn frame_len(&self) -> usize;
    /// Grows or shrinks the frame to `new_len` bytes and makes all of it
    /// directly accessible. Pointers taken before are invalid afterwards.
    fn resize(&self, new_len: u32) -> Result<(), ResizeError>;
}

pub struct Xdp<'a>(pub &'a XdpContext);

impl Packet for Xdp<'_> {
    #[inline(always)]
    fn data(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.0.data_end()
    }
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.0.data_end() - self.0.data()
    }
    #[inline(always)]
    fn resize(&self, new_len: u32) -> Result<(), ResizeError> {
        let delta = new_len as i32 - self.frame_len() as i32;
        if delta == 0 {
            return Ok(());
        }
        // A failed adjust leaves the frame as it was (generic XDP on a veth
        // often has too little tailroom to grow).
        let r = unsafe { h::bpf_xdp_adjust_tail(self.0.ctx, delta) };
        if r == 0 {
            Ok(())
        } else {
            Err(ResizeError::Untouched)
        }
    }
}

pub struct Tc<'a>(pub &'a TcContext);

/// Loads the `__sk_buff` field at `OFF` with one instruction on the
/// context pointer itself: LLVM may otherwise keep `ctx + OFF` in a
/// register across a helper call and load through it later, which the
/// verifier refuses ("dereference of modified ctx ptr").
#[inline(always)]
fn skb_field<const OFF: usize>(ctx: &TcContext) -> usize {
    // A 32-bit load zero-extends: the register is the field, no shifts
    // (which the verifier refuses on packet pointers).
    let v: u64;
    unsafe {
        core::arch::asm!(
            "{v} = *(u32 *)({p} + {off})",
            v = lateout(reg) v,
            p = in(reg) ctx.skb.skb,
            off = const OFF,
            options(readonly, nostack, preserves_flags),
        );
    }
    v as usize
}

const SKB_LEN: usize = core::mem::offset_of!(__sk_buff, len);
const SKB_DATA: usize = core::mem::offset_of!(__sk_buff, data);
const SKB_DATA_END: usize = core::mem::offset_of!(__sk_buff, data_end);

impl Packet for Tc<'_> {
    #[inline(always)]
    fn data(&self) -> usize {
        skb_field::<SKB_DATA>(self.0)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        skb_field::<SKB_DATA_END>(self.0)
    }
    #[inline(always)]
    fn frame_len(&self) -> usize {
        skb_field::<SKB_LEN>(self.0)
    }
    #[inline(always)]
    fn resize(&self, new_len: u32) -> Result<(), ResizeError> {
        if new_len as usize != self.frame_len() {
            // Fails before changing the skb (allocation) or not at all.
            let r = unsafe { h::bpf_skb_change_tail(self.0.skb.skb, new_len, 0) };
            if r != 0 {
                return Err(ResizeError::Untouched);
            }
        }
        // Direct packet access below needs the whole reply linear.
        let r = unsafe { h::bpf_skb_pull_data(self.0.skb.skb, new_len) };
        if r == 0 {
            Ok(())
        } else if new_len as usize == self.frame_len() {
            Err(ResizeError::Untouched)
        } else {
            Err(ResizeError::Touched)
        }
    }
}

/// Pointer to `len` bytes at frame offset `off`, or `err` when the frame is
/// shorter. The offset is hidden from the optimiser so the check stays on
/// the very pointer that is used (LLVM would otherwise merge offsets of
/// packet and map addresses, or drop checks implied by others, in ways the
/// verifier cannot follow).
#[inline(always)]
pub fn ptr_at<P: Packet>(p: &P, off: usize, len: usize, err: u32) -> Result<*mut u8, u32> {
    let start = p.data() + opaque(off);
    if start + len > p.data_end() {
        return Err(err);
    }
    Ok(start as *mut u8)
}

/// A network-order u16 loaded natively (the unit of checksum arithmetic).
#[inline(always)]
pub fn ld16(ptr: *const u8) -> u16 {
    unsafe { (ptr as *const u16).read_unaligned() }
}

#[inline(always)]
pub fn be16(ptr: *const u8) -> u16 {
    u16::from_be(ld16(ptr))
}

#[inline(always)]
pub fn ld32(ptr: *const u8) -> u32 {
    unsafe { (ptr as *const u32).read_unaligned() }
}

#[inline(always)]
pub fn st32(ptr: *mut u8, v: u32) {
    unsafe { (ptr as *mut u32).write_unaligned(v) }
}

#[inline(always)]
pub fn ld64(ptr: *const u8) -> u64 {
    unsafe { (ptr as *const u64).read_unaligned() }
}

#[inline(always)]
pub fn st16(ptr: *mut u8, v: u16) {
    unsafe { (ptr as *mut u16).write_unaligned(v) }
}

#[inline(always)]
pub fn st64(ptr: *mut u8, v: u64) {
    unsafe { (ptr as *mut u64).write_unaligned(v) }
}

#[inline(always)]
pub fn swap16(x: u16) -> u16 {
    x.rotate_left(8)
}

/// `x`, unknown to the optimiser. LLVM drops bounds checks it can prove
/// redundant from other pointers, and folds loop bounds it can derive;
/// the verifier tracks neither, so where that happens the value is hidden.
#[inline(always)]
pub fn opaque(x: usize) -> usize {
    let mut x = x;
    // SAFETY: one register move onto itself.
    unsafe { core::arch::asm!("{0} = {0}", inout(reg) x, options(pure, nomem, nostack)) };
    x
}

/// `v` passed through map memory (`slot` points into a per-CPU scratch
/// value): the verifier forgets how it was computed. Used on loop bounds
/// and on values a loop refines, so the paths out of a variable-length
/// loop continue as one verifier state instead of one each (and LLVM
/// cannot fold a loop's constant bound into its data-dependent one).
#[inline(always)]
pub fn launder(slot: *mut u64, v: usize) -> usize {
    unsafe {
        core::ptr::write_volatile(slot, v as u64);
        core::ptr::read_volatile(slot) as usize
    }
}
