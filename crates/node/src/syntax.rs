//! Rule 2 at submission: a command that compiles neither as a Python
//! expression nor as statements is rejected before anything is queued,
//! as the seed's client did. A small Python process, under the cluster's
//! interpreter, compiles each new command; results are remembered, since
//! pipelines send the same command strings again and again.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;

use casa_node_protocol::pb::CommandMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// Reads length-prefixed UTF-8 commands on stdin; answers each with a
/// length-prefixed "eval", "exec", or "error:" and the SyntaxError.
const CHECKER: &str = r#"
import struct, sys
inp, out = sys.stdin.buffer, sys.stdout.buffer
while True:
    head = inp.read(4)
    if len(head) < 4:
        break
    source = inp.read(struct.unpack(">I", head)[0]).decode("utf-8", "replace")
    try:
        compile(source, "<command>", "eval")
        answer = "eval"
    except SyntaxError:
        try:
            compile(source, "<command>", "exec")
            answer = "exec"
        except (SyntaxError, ValueError) as e:
            answer = "error:%s: %s" % (type(e).__name__, e)
    except ValueError as e:
        answer = "error:%s: %s" % (type(e).__name__, e)
    data = answer.encode("utf-8")
    out.write(struct.pack(">I", len(data)) + data)
    out.flush()
"#;

/// Why a command compiles neither as an expression nor as statements:
/// Python's own words, e.g. `SyntaxError: invalid syntax (<command>,
/// line 1)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidCommand(pub String);

/// Remembered answers before the memory is cleared.
const MEMORY: usize = 4096;

/// Compiles commands with the cluster's Python.
pub struct SyntaxChecker {
    child: Child,
    input: BufWriter<ChildStdin>,
    output: BufReader<ChildStdout>,
    memory: HashMap<String, Result<CommandMode, InvalidCommand>>,
}

impl SyntaxChecker {
    /// Starts the checker under `python`.
    pub fn start(python: &Path) -> std::io::Result<SyntaxChecker> {
        let mut child = Command::new(python)
            .arg("-c")
            .arg(CHECKER)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let input = BufWriter::new(child.stdin.take().expect("piped"));
        let output = BufReader::new(child.stdout.take().expect("piped"));
        Ok(SyntaxChecker {
            child,
            input,
            output,
            memory: HashMap::new(),
        })
    }

    /// EVAL or EXEC for `command`, or the SyntaxError that makes it
    /// neither.
    pub async fn check(
        &mut self,
        command: &str,
    ) -> std::io::Result<Result<CommandMode, InvalidCommand>> {
        if let Some(answer) = self.memory.get(command) {
            return Ok(answer.clone());
        }
        let len = u32::try_from(command.len()).map_err(std::io::Error::other)?;
        self.input.write_all(&len.to_be_bytes()).await?;
        self.input.write_all(command.as_bytes()).await?;
        self.input.flush().await?;
        let len = self.output.read_u32().await? as usize;
        let mut answer = vec![0; len];
        self.output.read_exact(&mut answer).await?;
        let answer = String::from_utf8_lossy(&answer);
        let result = match answer.as_ref() {
            "eval" => Ok(CommandMode::Eval),
            "exec" => Ok(CommandMode::Exec),
            other => Err(InvalidCommand(
                other.strip_prefix("error:").unwrap_or(other).to_owned(),
            )),
        };
        if self.memory.len() >= MEMORY {
            self.memory.clear();
        }
        self.memory.insert(command.to_owned(), result.clone());
        Ok(result)
    }

    /// Stops the checker.
    pub async fn stop(mut self) {
        drop(self.input);
        let _ = self.child.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rule_2_commands_are_expressions_statements_or_rejected() {
        let mut checker = SyntaxChecker::start(Path::new("python3")).unwrap();
        assert_eq!(checker.check("a+b").await.unwrap(), Ok(CommandMode::Eval));
        assert_eq!(
            checker.check("x = 1; y = 2").await.unwrap(),
            Ok(CommandMode::Exec)
        );
        assert_eq!(
            checker.check("import os").await.unwrap(),
            Ok(CommandMode::Exec)
        );
        let error = checker.check("1 +* 2").await.unwrap().unwrap_err();
        assert!(error.0.starts_with("SyntaxError: "), "{error}");
        assert_eq!(checker.check("a+b").await.unwrap(), Ok(CommandMode::Eval));
        assert!(checker.check("'\0'").await.unwrap().is_err());
        checker.stop().await;
    }
}
