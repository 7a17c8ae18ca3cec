//! One operation per volume at a time. The CSI spec asks a plugin to answer
//! `ABORTED` when an operation is already in progress for the same volume (the CO
//! then retries with backoff), rather than running two at once.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tonic::Status;

#[derive(Clone, Default)]
pub struct VolumeLocks {
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Held while an operation on the volume runs; released on drop.
pub struct VolumeGuard {
    busy: Arc<Mutex<HashSet<String>>>,
    id: String,
}

impl VolumeLocks {
    /// Takes the volume's lock, or `ABORTED` if another operation holds it.
    pub fn lock(&self, id: &str) -> Result<VolumeGuard, Status> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !busy.insert(id.to_string()) {
            return Err(Status::aborted(format!("an operation on volume {id} is already in progress")));
        }
        Ok(VolumeGuard { busy: self.busy.clone(), id: id.to_string() })
    }
}

impl Drop for VolumeGuard {
    fn drop(&mut self) {
        self.busy.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_operation_is_aborted_until_the_first_ends() {
        let locks = VolumeLocks::default();
        let g = locks.lock("pvc-1").expect("free");
        assert_eq!(locks.lock("pvc-1").err().map(|s| s.code()), Some(tonic::Code::Aborted));
        let _other = locks.lock("pvc-2").expect("another volume");
        drop(g);
        locks.lock("pvc-1").expect("released");
    }
}
