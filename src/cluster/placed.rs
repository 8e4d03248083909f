//! The results of a map, placed by index as they come back in any order, and handed over as
//! one vector without a copy: no `Option` per item, no second vector at the end (for a map
//! of millions of small items, those were most of the master's memory traffic).

use std::mem::{ManuallyDrop, MaybeUninit};

/// `n` places, each filled once (or refilled: the old value is dropped).
pub(crate) struct Placed<T> {
    slots: Vec<MaybeUninit<T>>,
    filled: Vec<bool>,
    missing: usize,
}

impl<T> Placed<T> {
    /// `n` empty places (their memory is only reserved until filled).
    pub(crate) fn new(n: usize) -> Placed<T> {
        let mut slots = Vec::with_capacity(n);
        // SAFETY: a MaybeUninit needs no initialisation; the capacity holds `n`.
        unsafe { slots.set_len(n) };
        Placed { slots, filled: vec![false; n], missing: n }
    }

    /// Puts `value` at `index`.
    pub(crate) fn put(&mut self, index: usize, value: T) {
        if std::mem::replace(&mut self.filled[index], true) {
            // SAFETY: it was filled, so it holds a value, dropped once here.
            unsafe { self.slots[index].assume_init_drop() };
        } else {
            self.missing -= 1;
        }
        self.slots[index].write(value);
    }

    /// Places not filled yet.
    pub(crate) fn missing(&self) -> usize {
        self.missing
    }

    /// The values in index order, once every place is filled.
    pub(crate) fn into_vec(self) -> Vec<T> {
        assert_eq!(self.missing, 0, "every item has a result");
        let mut me = ManuallyDrop::new(self);
        drop(std::mem::take(&mut me.filled));
        let mut slots = ManuallyDrop::new(std::mem::take(&mut me.slots));
        // SAFETY: every element is initialised (none missing), and MaybeUninit<T> has T's
        // size and alignment, so the allocation is that of a Vec<T> of the same capacity.
        unsafe { Vec::from_raw_parts(slots.as_mut_ptr().cast::<T>(), slots.len(), slots.capacity()) }
    }
}

impl<T> Drop for Placed<T> {
    fn drop(&mut self) {
        for (slot, filled) in self.slots.iter_mut().zip(&self.filled) {
            if *filled {
                // SAFETY: a filled place holds a value, dropped once here.
                unsafe { slot.assume_init_drop() };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use super::*;

    #[test]
    fn values_come_out_in_index_order_and_every_one_is_dropped_once() {
        let token = Rc::new(());
        let mut placed = Placed::new(4);
        for i in [2, 0, 3, 1, 2] {
            placed.put(i, (i, token.clone())); // index 2 twice: the first one is dropped
        }
        assert_eq!(Rc::strong_count(&token), 5);
        let values = placed.into_vec();
        assert_eq!(values.iter().map(|v| v.0).collect::<Vec<_>>(), [0, 1, 2, 3]);
        drop(values);
        assert_eq!(Rc::strong_count(&token), 1);
        let mut partial = Placed::new(3);
        partial.put(1, token.clone());
        assert_eq!(partial.missing(), 2);
        drop(partial); // a map that failed: the values it had are dropped
        assert_eq!(Rc::strong_count(&token), 1);
    }
}
